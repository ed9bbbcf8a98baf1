"""What resfast's benchmarks share, one concern per module.

The method, the same in every script:

- A *case* (an optimizer over a parameter list, a BN shape, a model) is run by several *paths*
  (torch's for-loop, foreach, fused and compiled versions, resfast's backends). Each path first runs
  from the same inputs as a reference and is compared with it; a path that disagrees is reported as
  WRONG and never timed, so no speed-up is ever shown for a wrong result.
- Timing: on CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call): median
  and 20th/80th percentiles. On CPU, the same statistics over repeated wall-clock calls. Warm-up
  calls come first (they also finish any compilation) and are never timed.
- Bandwidth: GB/s from the *minimal* byte count (each input read once, each output written once),
  beside the device-to-device copy bandwidth measured in the same run (bytes read + bytes written),
  so "% of copy" says how close a path gets to what the memory system can do.
- A figure from a loaded machine or a wide spread is marked unreliable, and its speed-up and % of
  copy are not shown (``reliability``).
- Every CSV row carries the device name, torch/triton versions, commit and date.

Modules:

- ``cli``: devices, dtypes and the options every script shares.
- ``env``: where and with what a run is made (device name, versions, commit, load), its header.
- ``timing``: the timers, byte counts and the copy bandwidth.
- ``correctness``: error measures and the tolerance check.
- ``context``: what a path's builder needs (device, compile and backend availability).
- ``paths``: evaluating one path (build, check, time) into an outcome.
- ``rows``: a path's outcome as a row, speed-ups within a case.
- ``reliability``: the rule that says when a row's figures can be trusted.
- ``table``, ``chart``: Markdown tables and PNG bar charts of rows.
- ``results``: one benchmark's CSV, written as each path finishes, and its printed tables.
"""
