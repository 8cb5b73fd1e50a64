"""Fault handling: `collectives` observes every collective through a wrapping
process-group backend and `recorder` keeps the per-process records that the
C4 detector and fault injection build on."""
