"""User-facing errors.

Everything a user can get wrong (a config key, a data line, a path) raises a
subclass of `UserError`. Entry points catch `UserError`, print its message
without a traceback and exit with `USER_ERROR_EXIT_CODE`. Anything else is a
bug in our code and keeps its traceback.
"""

USER_ERROR_EXIT_CODE = 2
MAX_LISTED_PROBLEMS = 20


class UserError(Exception):
    """A problem in the user's input, reported without a traceback."""


class ConfigError(UserError):
    """The config file or the command-line flags are invalid."""


class DataError(UserError):
    """A data file is missing, unreadable or malformed."""


def format_problems(header: str, problems: list[str], limit: int = MAX_LISTED_PROBLEMS) -> str:
    """One message listing the first `limit` problems and the total count."""
    lines = [header]
    lines += [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more ({len(problems)} problems in total)")
    else:
        lines.append(f"  ({len(problems)} problem{'s' if len(problems) != 1 else ''} in total)")
    return "\n".join(lines)
