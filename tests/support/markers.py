"""Markers for tests that need something this torch may lack."""

import pytest

from vistrain.models.attention import flex_available

# Only an unimportable flex_attention skips: a RuntimeError from our own masks or calls fails the test.
requires_flex = pytest.mark.skipif(not flex_available(), reason="torch.nn.attention.flex_attention does not import "
                                                                 "in this torch (it needs >= 2.5)")
