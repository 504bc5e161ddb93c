// hwgen weight ROM: DEPTH words of WIDTH bits, loaded from INIT_FILE with $readmemh
// (one hex word per line, address 0 first). Synchronous read: data is the word at the
// address of the previous clock edge (the timing of the inline Amaranth Memory).
module hwgen_rom #(
    parameter integer DEPTH = 1,
    parameter integer WIDTH = 1,
    parameter INIT_FILE = ""
) (
    input  wire                                      clk,
    input  wire [(DEPTH > 1 ? $clog2(DEPTH) : 1)-1:0] addr,
    output reg  [WIDTH-1:0]                          data
);
    reg [WIDTH-1:0] mem [0:DEPTH-1];
    initial begin
        $readmemh(INIT_FILE, mem);
        data = {WIDTH{1'b0}};
    end
    always @(posedge clk) data <= mem[addr];
endmodule
