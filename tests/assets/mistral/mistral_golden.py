"""Write mistral_common_v1.json: mistral-common's own ids for every parity case (a dev tool).

Run where mistral-common is installed (it is not a dependency of this project), e.g.
`python -m venv /tmp/mc && /tmp/mc/bin/pip install mistral-common sentencepiece &&
/tmp/mc/bin/python tests/assets/mistral/mistral_golden.py`. tokenizer.model.v1 beside this file is
mistral-common's data/tokenizer.model.v1 (Mistral-7B-Instruct v0.1/v0.2, Mixtral-8x7B-Instruct).
"""

import json
from pathlib import Path

from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

HERE = Path(__file__).parent
KINDS = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


def main() -> None:
    tok = MistralTokenizer.from_file(str(HERE / "tokenizer.model.v1"), mode=ValidationMode.finetuning)
    cases = json.loads((HERE.parent / "parity_cases.json").read_text())
    out = {}
    for name, msgs in cases.items():
        messages = [KINDS[m["role"]](content=m["content"]) for m in msgs]
        out[name] = tok.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    (HERE / "mistral_common_v1.json").write_text(json.dumps(out) + "\n")
    print(f"{len(out)} cases written with {type(tok.instruct_tokenizer).__name__}")


if __name__ == "__main__":
    main()
