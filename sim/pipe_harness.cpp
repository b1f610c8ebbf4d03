// A plain C++ Verilator harness: the design's byte streams (i_stream, o_stream) on stdin/stdout
// (Verilator escapes the double underscore of Amaranth's port names as ___05F).
// It lets the host driver talk to the generated Verilog at full Verilator speed (no cocotb):
// `mmfree-fpga serve --backend rtl` runs it as a subprocess (sim/pipe.py).
//
// The clock keeps simulated time honest where the design measures time. The design reports
// its activity on two ports (hw/linked_engine.py, activity_ports=True):
//   busy  (bytes waiting on stdin, or not `idle`): the clock runs at full speed (an engine
//         step is as fast as Verilator can make it);
//   `idle` and `in_frame`: a partial frame waits for its next byte and the Link's idle timeout
//         counts cycles: the clock is paced to clock_hz cycles per wall-clock second, so the
//         timeout (FRAME_IDLE_TIMEOUT_S * clock_hz cycles) takes FRAME_IDLE_TIMEOUT_S of wall
//         time, as on a board (if Verilator is slower than clock_hz it runs flat out);
//   `idle` alone: nothing happens until a byte arrives: the clock stops and the harness sleeps
//         in select(). Before the first byte it is paced instead, for at most boot_pace_s, so
//         the Link's boot id (cycles from reset to the first byte) depends on when the host
//         first speaks, as on a board.
// Simulated time runs ahead of wall time while the design is busy; a partial frame that
// arrives then may time out early, which costs the host a retransmission, nothing more.
//
// Options (name=value arguments):
//   clock_hz=R        the nominal clock rate (required; sim/pipe.py PIPE_CLOCK_HZ)
//   boot_pace_s=S     pace the clock before the first byte for at most S s (default 0)
//   status_fd=N       write "idle <bytes read> <cycle>\n" to fd N whenever the design goes idle
//                     with all its output written (the host side's settle())
//   waves=FILE waves_from=A waves_to=B   (a --trace-fst build) dump cycles [A, B) into FILE;
//                     cycle N is at N periods of clock_hz (in ns), its rising edge half a period on
//
// stdin's end: the harness finishes (a partial frame times out, output is written) and exits.
#include <fcntl.h>
#include <signal.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>

#include "Vtop.h"
#include "verilated.h"
#if VM_TRACE_FST
#include "verilated_fst_c.h"
#endif

static double now_s() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static const uint64_t IO_EVERY = 1024;     // busy: look at the pipes every this many cycles
// busy: output is written once the design has sent nothing for this many cycles (a response
// goes out whole, as a UART sends it, not in pieces a host might take for a broken frame)
static const uint64_t OUT_PAUSE = 64;
static const size_t OUT_MAX = 65536;       // ... or once this much has piled up
static const double PACE_SLICE_S = 0.001;  // paced: run in slices of this much wall time

int main(int argc, char** argv) {
    double clock_hz = 0, boot_pace_s = 0;
    int status_fd = -1;
    std::string waves;
    uint64_t waves_from = 0, waves_to = UINT64_MAX;
    for (int k = 1; k < argc; k++) {
        const char* a = argv[k];
        const char* eq = strchr(a, '=');
        if (!eq) continue;
        std::string key(a, eq - a);
        const char* v = eq + 1;
        if (key == "clock_hz") clock_hz = atof(v);
        else if (key == "boot_pace_s") boot_pace_s = atof(v);
        else if (key == "status_fd") status_fd = atoi(v);
        else if (key == "waves") waves = v;
        else if (key == "waves_from") waves_from = strtoull(v, nullptr, 10);
        else if (key == "waves_to") waves_to = strtoull(v, nullptr, 10);
    }
    if (clock_hz <= 0) {
        fprintf(stderr, "pipe harness: clock_hz=R (R > 0) is required\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);  // a reader that left: write() fails, the harness ends quietly
    VerilatedContext ctx;
    ctx.commandArgs(argc, argv);
#if VM_TRACE_FST
    ctx.traceEverOn(true);
#endif
    Vtop top{&ctx};
#if VM_TRACE_FST
    VerilatedFstC* tfp = nullptr;
    if (!waves.empty()) {
        tfp = new VerilatedFstC;
        top.trace(tfp, 99);
        tfp->set_time_unit("1ns");
        tfp->set_time_resolution("1ns");
        tfp->open(waves.c_str());
        if (!tfp->isOpen()) {
            fprintf(stderr, "pipe harness: cannot open %s\n", waves.c_str());
            return 2;
        }
    }
#else
    if (!waves.empty()) {
        fprintf(stderr, "pipe harness: waves= needs a build with --trace-fst\n");
        return 2;
    }
#endif
    uint64_t cycle = 0;
    // one dump per clock edge: cycle N is clk low at N periods of the nominal clock (in ns) and
    // its rising edge half a period later
    const uint64_t period_ns = (uint64_t)(1e9 / clock_hz + 0.5);
    auto dump = [&](uint64_t t) {
#if VM_TRACE_FST
        if (tfp && cycle >= waves_from && cycle < waves_to) tfp->dump(t);
        if (tfp && cycle >= waves_to) {
            tfp->close();
            delete tfp;
            tfp = nullptr;
        }
#else
        (void)t;
#endif
    };
    top.clk = 0;
    top.rst = 1;
    for (int k = 0; k < 8; k++) {
        top.clk = !top.clk;
        top.eval();
    }
    top.rst = 0;
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    fcntl(1, F_SETFL, fcntl(1, F_GETFL) | O_NONBLOCK);
    if (status_fd >= 0) fcntl(status_fd, F_SETFL, fcntl(status_fd, F_GETFL) | O_NONBLOCK);

    std::deque<uint8_t> in;
    std::string out;
    uint64_t bytes_in = 0, last_out = 0;
    bool eof = false, got_byte = false, reported = false;
    bool pacing = false;
    double pace_t0 = 0;
    uint64_t pace_c0 = 0;
    const double start = now_s();
    uint8_t buf[65536];

    // write what stdout takes now
    auto flush = [&]() {
        while (!out.empty()) {
            ssize_t w = write(1, out.data(), out.size());
            if (w > 0) {
                out.erase(0, (size_t)w);
            } else if (w < 0 && errno == EINTR) {
                continue;
            } else if (w < 0 && errno == EAGAIN) {
                break;
            } else {
                exit(0);  // the reader is gone
            }
        }
    };
    // wait up to `timeout` s (< 0: forever) for stdin, or for stdout to take more output; then
    // read what stdin has
    auto wait = [&](double timeout) {
        fd_set rd, wr;
        FD_ZERO(&rd);
        FD_ZERO(&wr);
        if (!eof) FD_SET(0, &rd);
        if (!out.empty()) FD_SET(1, &wr);
        struct timeval tv, *tvp = nullptr;
        if (timeout >= 0) {
            tv.tv_sec = (time_t)timeout;
            tv.tv_usec = (suseconds_t)((timeout - (double)tv.tv_sec) * 1e6);
            tvp = &tv;
        }
        if (eof && out.empty()) {
            if (timeout > 0) select(0, nullptr, nullptr, nullptr, tvp);
            return;
        }
        if (select(2, &rd, &wr, nullptr, tvp) > 0 && FD_ISSET(0, &rd)) {
            ssize_t n = read(0, buf, sizeof buf);
            if (n == 0) eof = true;
            for (ssize_t k = 0; k < n; k++) in.push_back(buf[k]);
            if (n > 0) {
                bytes_in += (uint64_t)n;
                reported = false;
            }
        }
    };
    auto io = [&](double timeout) {
        flush();
        wait(timeout);
    };

    auto step = [&]() {
        top.i_stream___05Fvalid = !in.empty();
        top.i_stream___05Fpayload = in.empty() ? 0 : in.front();
        top.o_stream___05Fready = 1;
        top.clk = 0;
        top.eval();
        dump(period_ns * cycle);
        bool take_in = top.i_stream___05Fvalid && top.i_stream___05Fready;
        bool take_out = top.o_stream___05Fvalid && top.o_stream___05Fready;
        uint8_t byte = top.o_stream___05Fpayload;
        top.clk = 1;
        top.eval();
        dump(period_ns * cycle + period_ns / 2);
        if (take_in) {
            in.pop_front();
            got_byte = true;
        }
        if (take_out) {
            out.push_back((char)byte);
            last_out = cycle;
        }
        cycle++;
    };

    while (true) {
        bool quiet = in.empty() && top.idle;
        if (!quiet) {  // busy: full speed
            pacing = false;
            step();
            if (cycle % IO_EVERY == 0) {
                if (cycle - last_out >= OUT_PAUSE || out.size() >= OUT_MAX) flush();
                wait(0.0);
            }
            continue;
        }
        bool booting = !got_byte && !eof && now_s() - start < boot_pace_s;
        if (top.in_frame || booting) {  // time matters: clock_hz cycles per second
            double t = now_s();
            if (!pacing) {
                pacing = true;
                pace_t0 = t;
                pace_c0 = cycle;
            }
            uint64_t due = pace_c0 + (uint64_t)((t - pace_t0) * clock_hz);
            while (cycle < due && in.empty() && top.idle && (top.in_frame || booting)) step();
            if (cycle >= due) io(pace_t0 + (double)(cycle - pace_c0) / clock_hz + PACE_SLICE_S - t);
            else io(0.0);
            continue;
        }
        // idle: nothing happens until a byte comes; the clock stops
        pacing = false;
        flush();
        if (!out.empty()) {
            wait(-1.0);  // for stdout to take the rest, or for input
            continue;
        }
        if (eof) break;
        if (status_fd >= 0 && !reported) {
            char line[64];
            int n = snprintf(line, sizeof line, "idle %llu %llu\n", (unsigned long long)bytes_in,
                             (unsigned long long)cycle);
            ssize_t w = write(status_fd, line, (size_t)n);
            (void)w;
            reported = true;
        }
        wait(-1.0);
    }
#if VM_TRACE_FST
    if (tfp) {
        tfp->close();
        delete tfp;
    }
#endif
    top.final();
    return 0;
}
