"""channel-canary: synthetic end-to-end canary traffic for customer-support platforms."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("channel-canary")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
