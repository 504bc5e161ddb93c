# Arty A7 constraints skeleton, written by hwgen. The clock is the only constraint the
# network needs; pin assignments belong to the wrapper that connects it to the board.
create_clock -period @CLOCK_PERIOD_NS@ -name clk [get_ports clk]
# set_property -dict { PACKAGE_PIN E3 IOSTANDARD LVCMOS33 } [get_ports clk]   ;# 100 MHz oscillator
# set_property -dict { PACKAGE_PIN C2 IOSTANDARD LVCMOS33 } [get_ports rst]   ;# ck_rst (active low on the board)
