"""Scenarios for the two-node overlay lab (netns_lab/labs/overlay.toml): node a holds
blue1, blue3 and red1, node b blue2, blue4 and red2; blue and red use the same addresses
and MACs, with VNIs 5010 and 5020. See netns_lab/scenarios/__init__.py for the format."""
