// hwgen weight ROM: DEPTH words of WIDTH bits, loaded from INIT_FILE with $readmemh
// (one hex word per line, address 0 first). Synchronous read: data is the word at the
// address of the previous clock edge (the timing of the inline Amaranth Memory).
// LOGIC = 1 asks synthesis for LUTs (a shallow ROM), 0 for block RAM. The file's words
// are WORD bits wide; data is their bits [LSB, LSB + WIDTH) (a ROM in logic is read in
// column slices, each at its own copy of the address).
module hwgen_rom #(
    parameter integer DEPTH = 1,
    parameter integer WIDTH = 1,
    parameter INIT_FILE = "",
    parameter integer LOGIC = 0,
    parameter integer WORD = WIDTH,
    parameter integer LSB = 0
) (
    input  wire                                      clk,
    input  wire [(DEPTH > 1 ? $clog2(DEPTH) : 1)-1:0] addr,
    output reg  [WIDTH-1:0]                          data
);
    initial data = {WIDTH{1'b0}};
    generate
        if (LOGIC) begin : logic_rom
            (* rom_style = "logic" *) reg [WORD-1:0] mem [0:DEPTH-1];
            initial $readmemh(INIT_FILE, mem);
            always @(posedge clk) data <= mem[addr][LSB +: WIDTH];
        end else begin : block_rom
            (* rom_style = "block" *) reg [WORD-1:0] mem [0:DEPTH-1];
            initial $readmemh(INIT_FILE, mem);
            always @(posedge clk) data <= mem[addr][LSB +: WIDTH];
        end
    endgenerate
endmodule
