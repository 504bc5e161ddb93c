# Timing constraints skeleton, written by hwgen.
create_clock -name clk -period @CLOCK_PERIOD_NS@ [get_ports clk]
derive_clock_uncertainty
