"""Fault handling: `collectives` observes every collective through a wrapping
process-group backend, `recorder` keeps the per-process records; on top of them
C4 (`publisher` on each rank, `detector` in the launcher or the ranks) names hung
and slow ranks and links, `inject` makes faults for drills, `health` reads NVML."""
