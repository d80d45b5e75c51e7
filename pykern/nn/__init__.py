"""Modules that subclass torch.nn's and override forward only (state_dicts load both ways).

The layout family has no modules; the op families add theirs here.
"""
