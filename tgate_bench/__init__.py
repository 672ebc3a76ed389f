"""The benchmark: T-GATE against plain sampling on random-weight models of every family, side by
side in one process. Its models and ComfyUI loader come from `tgate_testkit`, which the tests share.
"""
