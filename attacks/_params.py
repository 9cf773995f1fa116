"""Former home of the parameter validators, now :mod:`psfed_robust.params`.

Only ``defenses/mean.py`` still imports ``check_choice`` from here; once it imports
``psfed_robust.params`` this module can go.
"""

from psfed_robust.params import (
    ParamError,
    check_bool,
    check_choice,
    check_int,
    check_real,
    unknown_params,
)

__all__ = ["ParamError", "check_bool", "check_choice", "check_int", "check_real", "unknown_params"]
