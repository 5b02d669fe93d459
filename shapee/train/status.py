"""Re-export of :mod:`shapee.runstatus` (its old home): whether a run finished."""

from shapee.runstatus import *  # noqa: F401,F403
from shapee.runstatus import run_status, unfinished_reason, write_status  # noqa: F401
