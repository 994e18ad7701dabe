"""Every size the config accepts must give a program the verifier loads: build the
datapath (and its trace build) at the config's upper limit for masks, the bounded loop
the verifier walks the longest."""
import ctypes as ct

import pytest

from agent import abi, config
from .conftest import loaded

pytestmark = pytest.mark.bpf


def test_the_largest_mask_count_the_config_accepts_loads_in_both_builds():
    top = config.parse("[datapath]\nmax_masks = 32\n")
    with pytest.raises(config.ConfigError):
        config.parse("[datapath]\nmax_masks = 33\n")
    defines = dict(top.datapath_defines(), XF_FLOW_TABLE_SIZE=4096, XF_MAX_RULE_ENTRIES=1024,
                   XF_MAX_ENDPOINTS=64, XF_MAX_ROUTES=64, XF_MAX_PORTS=16)
    with loaded(defines) as dp:
        assert dp.prog_fd >= 0
        assert dp.load_trace() >= 0
        assert dp.maps["xf_masks"].value_size == 8 + ct.sizeof(abi.Mask) * 32
