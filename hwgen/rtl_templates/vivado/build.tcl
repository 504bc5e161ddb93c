# Vivado non-project flow for the Arty A7-35T (xc7a35ticsg324-1L), written by hwgen.
# Run from this folder:  vivado -mode batch -source build.tcl
# The network top (@TOP@) has AXI4-Stream ports; wire it to your own I/O in a wrapper,
# or use it out of context as below to read its utilisation and timing.
set top @TOP@
set part xc7a35ticsg324-1L
file mkdir out
@READ_SOURCES@
read_xdc arty_a7.xdc
synth_design -top $top -part $part -mode out_of_context
opt_design
place_design
route_design
report_utilization -file out/utilization.rpt
report_timing_summary -file out/timing.rpt
write_checkpoint -force out/$top.dcp
