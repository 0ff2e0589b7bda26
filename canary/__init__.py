"""channel-canary: synthetic end-to-end canary traffic for customer-support platforms."""

from canary.contract import VERSION as __version__

__all__ = ["__version__"]
