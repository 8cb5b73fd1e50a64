"""Fault handling: `collectives` observes every collective through a wrapping
process-group backend, `recorder` keeps the per-process records; on top of them
C4 (`publisher` on each rank writes `wire` records; `watcher`, in the launcher or the
ranks, runs the `rules` with `settings`) names hung and slow ranks and links, `inject`
makes faults for drills, `health` reads NVML."""
