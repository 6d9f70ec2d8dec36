"""The base of every error that is the user's to fix (bad input, missing files, typos).

Command-line tools (`cli.run`) print such an error as one or two lines on stderr and exit
with status 2; any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A mistake in what the user gave: the message names the file, field or flag and what
  was expected, so that it can be fixed without reading the code."""


class ConfigError(UserError, ValueError):
  """A configuration field with a value the run cannot use."""
