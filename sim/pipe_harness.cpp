// A plain C++ Verilator harness: the design's byte streams (i_stream, o_stream) on stdin/stdout
// (Verilator escapes the double underscore of Amaranth's port names as ___05F).
// It lets the host driver talk to the generated Verilog at full Verilator speed (no cocotb):
// `mmfree-fpga serve --backend rtl` runs it as a subprocess. The clock runs freely while the
// design works; once it has answered everything it was sent and stays quiet, the harness
// sleeps in select() until the host sends more.
#include <fcntl.h>
#include <sys/select.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <string>

#include "Vtop.h"
#include "verilated.h"

static const uint64_t QUIET_CYCLES = 200000;  // quiet this long after answering: go to sleep

int main(int argc, char** argv) {
    VerilatedContext ctx;
    ctx.commandArgs(argc, argv);
    Vtop top{&ctx};
    top.clk = 0;
    top.rst = 1;
    for (int k = 0; k < 8; k++) {
        top.clk = !top.clk;
        top.eval();
    }
    top.rst = 0;
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);

    std::deque<uint8_t> in;
    std::string out;
    uint64_t cycle = 0, last_in = 0, last_out = 0;
    bool answered = true, eof = false;
    uint8_t buf[65536];
    while (true) {
        bool idle = in.empty() && answered && cycle - last_out > QUIET_CYCLES;
        if (idle || (cycle & 1023) == 0) {
            if (!out.empty()) {
                size_t done = 0;
                while (done < out.size()) {
                    ssize_t w = write(1, out.data() + done, out.size() - done);
                    if (w < 0 && errno != EINTR && errno != EAGAIN) return 0;
                    if (w > 0) done += (size_t)w;
                }
                out.clear();
            }
            if (eof) return 0;
            fd_set fds;
            FD_ZERO(&fds);
            FD_SET(0, &fds);
            struct timeval tv = {idle ? 0 : 0, idle ? 20000 : 0};
            if (select(1, &fds, nullptr, nullptr, &tv) > 0) {
                ssize_t n = read(0, buf, sizeof buf);
                if (n == 0) eof = true;  // host closed: finish the pending output, then stop
                for (ssize_t k = 0; k < n; k++) in.push_back(buf[k]);
            }
        }
        top.i_stream___05Fvalid = !in.empty();
        top.i_stream___05Fpayload = in.empty() ? 0 : in.front();
        top.o_stream___05Fready = 1;
        top.clk = 0;
        top.eval();
        bool take_in = top.i_stream___05Fvalid && top.i_stream___05Fready;
        bool take_out = top.o_stream___05Fvalid && top.o_stream___05Fready;
        uint8_t byte = top.o_stream___05Fpayload;
        top.clk = 1;
        top.eval();
        if (take_in) {
            in.pop_front();
            last_in = cycle;
            answered = false;
        }
        if (take_out) {
            out.push_back((char)byte);
            last_out = cycle;
            answered = true;
        }
        if (eof && in.empty() && cycle - (last_in > last_out ? last_in : last_out) > QUIET_CYCLES) {
            if (!out.empty()) {
                ssize_t w = write(1, out.data(), out.size());
                (void)w;
            }
            return 0;
        }
        cycle++;
    }
}
