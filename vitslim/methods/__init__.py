"""Compression methods: the interface (``vitslim.methods.base``) and one module per method, registered by name."""
from vitslim.methods.base import (AttnInfo, KeepRateLevels, Method, MethodOptions, ParamOptions, Reducer,
                                  calibration_batches, check_locations, check_rate, check_rates,
                                  get_method, methods, rates_per_location, register, resolve_locations)

__all__ = ["AttnInfo", "KeepRateLevels", "Method", "MethodOptions", "ParamOptions", "Reducer", "calibration_batches",
           "check_locations", "check_rate", "check_rates", "get_method", "methods",
           "rates_per_location", "register", "resolve_locations"]
