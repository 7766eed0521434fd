"""A local Etsy Open API v3 + image CDN: deterministic catalogue, real paging/auth/rate-limit rules, injectable faults.

    with Simulator(listings=200, seed=1, qps=10, qpd=10000, faults=Faults(api_429=0.05)) as sim:
        requests.get(sim.api_base + "/listings/active", headers={"x-api-key": sim.api_key_header})

See docs/etsy_simulator.md.
"""

from imageselector.etsy.simulator.faults import Faults
from imageselector.etsy.simulator.server import Simulator

__all__ = ["Faults", "Simulator"]
