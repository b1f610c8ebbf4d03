// A plain C++ Verilator harness of the engine's simulation top (sim/engine_sim.py builds it around
// the generated `engine_top` with its memory model and $readmemh weight store): the whole
// prompt/steps sequence runs here, no Python per cycle.
//
// Compiled with -DMMFREE_DRAM, it drives the DRAM top instead (sim/dram_sim.py DramEngineSimTop:
// the engine with a generated LiteDRAM core and LiteDRAM's SDRAM model): no memory-model inputs;
// it waits for init_done after reset, the image goes in through `load`, and the top's counters of
// the weight traffic are reported at the end.
//
// Command line: Vengine [+weights=FILE] [WAVES_FILE]; the job on stdin, the results on stdout.
// The job is whitespace-separated `key value...` entries, in any order, ending with `run`:
//
//   cmd RESET_STATE FEED_TOKEN SET_PARAM INDEX_SHIFT ARG_SHIFT
//                              the command encoding (hw/engine.py: EngineOp values, cmd_layout offsets)
//   result TOKEN LOGIT CYCLES  bit offsets (multiples of 32) of the result fields (result_layout)
//   mem BANDWIDTH_Q8 LATENCY STALL_RATE_X256 SYNTHETIC   the memory model's inputs
//   cmd_stall RATE SEED        probability of an idle cycle before each command (and before taking
//                              each result), drawn from a PRNG seeded with SEED
//   trace 0|1                  report every cycle with trace__valid high
//   waves FROM TO PERIOD       (a --trace-fst build only) dump cycles FROM..TO-1 to WAVES_FILE (FST),
//                              a cycle lasting PERIOD ns
//   watchdog N                 give up (exit 3) when a handshake or result waits N cycles
//   param INDEX VALUE          one SET_PARAM (repeated; sent in the order given)
//   prompt N ID...             the prompt
//   steps N                    generated tokens (N - 1 of them are fed back)
//   read_logits N INDEX...     logits read back after every step
//   load LOAD_RESET FILE       before the parameters: LOAD_RESET (its op code), then FILE's bytes
//                              through `load` (with the idle cycles of cmd_stall before each byte)
//   run
//
// Output lines (one step's lines are flushed when the step ends):
//   step T TOKEN LOGIT CYCLES  the result of feeding token T (TOKEN: the argmax; CYCLES counted by
//                              the engine from accepting FEED_TOKEN to offering the result)
//   logit T INDEX VALUE        a logit read back after step T
//   trace T HEX                a trace__payload word (what the writer stores), in store order
//   done SIM_CYCLES WALL_S     clock cycles from the first FEED_TOKEN to the end, and their wall time
//   loaded BYTES CYCLES        (with `load`) the image sent, in CYCLES clock cycles from LOAD_RESET
//   init CYCLES                (DRAM) cycles from the end of reset to init_done
//   dram BEATS CYCLES WAIT     (DRAM, before `done`) the top's weight_beats, weight_cycles and
//                              weight_wait_cycles counters
//
// One clock cycle: the inputs are set, the design settles with clk low, outputs are sampled (a
// handshake happens when valid and ready are both high there), then clk rises. In a waveform,
// cycle N is clk low from N * PERIOD ns and rises at (N + 1/2) * PERIOD; cycle 0 is the first reset
// cycle.
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "Vengine.h"
#include "verilated.h"
#if VM_TRACE
#include "verilated_fst_c.h"
#endif

namespace {

const int RESET_CYCLES = 3;

// the 32-bit field at bit OFFSET (a multiple of 32) of a port, whatever C type Verilator gave it
template <typename T>
uint32_t field32(const T& v, unsigned offset) { return (uint32_t)((uint64_t)v >> offset); }
template <std::size_t N>
uint32_t field32(const VlWide<N>& v, unsigned offset) { return v[offset / 32]; }

template <typename T>
void put_hex(std::string& out, const T& v) {
    char buf[24];
    snprintf(buf, sizeof buf, "%" PRIx64, (uint64_t)v);
    out += buf;
}
template <std::size_t N>
void put_hex(std::string& out, const VlWide<N>& v) {
    std::size_t k = N;
    while (k > 1 && v[k - 1] == 0) k--;
    char buf[16];
    snprintf(buf, sizeof buf, "%x", v[k - 1]);
    out += buf;
    while (k-- > 1) {
        snprintf(buf, sizeof buf, "%08x", v[k - 1]);
        out += buf;
    }
}

struct Job {
    uint64_t op_reset_state = 0, op_feed_token = 0, op_set_param = 0;
    unsigned index_shift = 0, arg_shift = 0, token_bit = 0, logit_bit = 0, cycles_bit = 0;
    bool have_cmd = false, have_result = false;
    uint32_t mem_bandwidth = 0, mem_latency = 1, mem_stall_rate = 0, mem_synthetic = 0;
    double cmd_stall = 0.0;
    uint64_t seed = 1;
    bool trace = false;
    std::string waves;  // from the command line
    uint64_t waves_from = 0, waves_to = 0, period = 0;
    uint64_t watchdog = UINT64_MAX;
    std::vector<std::pair<uint32_t, uint32_t>> params;
    std::vector<uint32_t> prompt, read_logits;
    uint32_t steps = 1;
    bool load = false;
    uint64_t op_load_reset = 0;
    std::string load_file;
};

[[noreturn]] void fail(const std::string& what) {
    fprintf(stderr, "engine_harness: %s\n", what.c_str());
    exit(2);
}

std::vector<uint32_t> read_list(std::istream& in) {
    std::size_t n;
    if (!(in >> n)) fail("bad list length");
    std::vector<uint32_t> v(n);
    for (auto& x : v)
        if (!(in >> x)) fail("bad list entry");
    return v;
}

Job read_job(std::istream& in) {
    Job job;
    std::string key;
    while (in >> key) {
        if (key == "run") return job;
        bool ok = true;
        if (key == "cmd") {
            ok = bool(in >> job.op_reset_state >> job.op_feed_token >> job.op_set_param >> job.index_shift >>
                      job.arg_shift);
            job.have_cmd = true;
        } else if (key == "result") {
            ok = bool(in >> job.token_bit >> job.logit_bit >> job.cycles_bit) && job.token_bit % 32 == 0 &&
                 job.logit_bit % 32 == 0 && job.cycles_bit % 32 == 0;
            job.have_result = true;
        } else if (key == "mem") ok = bool(in >> job.mem_bandwidth >> job.mem_latency >> job.mem_stall_rate >> job.mem_synthetic);
        else if (key == "cmd_stall") ok = bool(in >> job.cmd_stall >> job.seed);
        else if (key == "trace") ok = bool(in >> job.trace);
        else if (key == "waves") ok = bool(in >> job.waves_from >> job.waves_to >> job.period);
        else if (key == "watchdog") ok = bool(in >> job.watchdog);
        else if (key == "param") {
            uint32_t i, v;
            ok = bool(in >> i >> v);
            job.params.emplace_back(i, v);
        } else if (key == "prompt") job.prompt = read_list(in);
        else if (key == "steps") ok = bool(in >> job.steps);
        else if (key == "read_logits") job.read_logits = read_list(in);
        else if (key == "load") ok = job.load = bool(in >> job.op_load_reset >> job.load_file);
        else fail("unknown job key " + key);
        if (!ok) fail("bad value for " + key);
    }
    fail("the job does not end with 'run'");
}

class Bench {
  public:
    Bench(VerilatedContext& ctx, const Job& job) : job_(job), top_(&ctx), rng_(job.seed) {
#if VM_TRACE
        if (!job.waves.empty()) {
            top_.trace(&fst_, 99);
            fst_.set_time_unit("1ns");
            fst_.set_time_resolution("1ns");
            fst_.open(job.waves.c_str());
            if (!fst_.isOpen()) fail("cannot open " + job.waves);
        }
#else
        if (!job.waves.empty()) fail("waves need a --trace-fst build");
#endif
        top_.clk = 0;
        top_.rst = 1;
        top_.cmd___05Fvalid = 0;
        top_.load___05Fvalid = 0;
        top_.result___05Fready = 0;
        top_.logit_req___05Fvalid = 0;
        top_.logit_resp___05Fready = 1;
        top_.trace___05Fready = 1;
#ifndef MMFREE_DRAM
        top_.mem_bandwidth = job.mem_bandwidth;
        top_.mem_latency = job.mem_latency;
        top_.mem_stall_rate = job.mem_stall_rate;
        top_.mem_synthetic = job.mem_synthetic;
#endif
        for (int k = 0; k < RESET_CYCLES; k++) clock();
        top_.rst = 0;
    }

    ~Bench() {
#if VM_TRACE
        if (fst_.isOpen()) fst_.close();
#endif
        top_.final();
    }

    void run() {
#ifdef MMFREE_DRAM
        const uint64_t reset_end = cycle_;
        settle_until([this] { return top_.init_done; });
        char head[64];
        snprintf(head, sizeof head, "init %" PRIu64 "\n", cycle_ - reset_end);
        out_ += head;
#endif
        if (job_.load) load_image();
        for (auto& p : job_.params) command(job_.op_set_param, p.first, p.second);
        command(job_.op_reset_state);
        std::vector<uint32_t> tokens = job_.prompt;
        const std::size_t feeds = job_.prompt.size() + job_.steps - 1;
        const uint64_t start_cycle = cycle_;
        const auto start = std::chrono::steady_clock::now();
        for (step_ = 0; step_ < feeds; step_++) {
            command(job_.op_feed_token, 0, tokens[step_]);
            settle_until([this] { return top_.result___05Fvalid; });
            const uint32_t token = field32(top_.result___05Fpayload, job_.token_bit);
            const uint32_t logit = field32(top_.result___05Fpayload, job_.logit_bit);
            const uint32_t cycles = field32(top_.result___05Fpayload, job_.cycles_bit);
            idle();
            top_.result___05Fready = 1;
            clock();
            top_.result___05Fready = 0;
            if (step_ + 1 >= job_.prompt.size()) tokens.push_back(token);
            char line[96];
            snprintf(line, sizeof line, "step %u %u %d %u\n", step_, token, (int32_t)logit, cycles);
            out_ += line;
            for (uint32_t index : job_.read_logits) {
                top_.logit_req___05Fpayload = index;
                top_.logit_req___05Fvalid = 1;
                settle_until([this] { return top_.logit_req___05Fready; });
                edge();
                top_.logit_req___05Fvalid = 0;
                settle_until([this] { return top_.logit_resp___05Fvalid; });
                snprintf(line, sizeof line, "logit %u %u %d\n", step_, index, (int32_t)top_.logit_resp___05Fpayload);
                out_ += line;
                edge();
            }
            flush();
        }
        const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        char line[96];
#ifdef MMFREE_DRAM
        snprintf(line, sizeof line, "dram %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", (uint64_t)top_.weight_beats,
                 (uint64_t)top_.weight_cycles, (uint64_t)top_.weight_wait_cycles);
        out_ += line;
#endif
        snprintf(line, sizeof line, "done %" PRIu64 " %.9f\n", cycle_ - start_cycle, wall);
        out_ += line;
        flush();
    }

  private:
    // the design settled with clk low and the current inputs
    void settle() {
        top_.clk = 0;
        top_.eval();
    }

    // settle, then clock cycles until `cond` holds on the settled design (it is left settled)
    template <typename F>
    void settle_until(F cond) {
        settle();
        for (uint64_t waited = 0; !cond(); waited++) {
            if (waited == job_.watchdog) {
                flush();
                fprintf(stderr, "engine_harness: nothing happened for %" PRIu64 " cycles in step %u (cycle %" PRIu64 ")\n",
                        waited, step_, cycle_);
                exit(3);
            }
            edge();
            settle();
        }
    }

    void clock() {
        settle();
        edge();
    }

    // the rest of a clock cycle on the settled design: sample the trace port, rising edge
    void edge() {
        if (job_.trace && top_.trace___05Fvalid) {
            char head[32];
            snprintf(head, sizeof head, "trace %u ", step_);
            out_ += head;
            put_hex(out_, top_.trace___05Fpayload);
            out_ += '\n';
        }
#if VM_TRACE
        const bool dump = fst_.isOpen() && cycle_ >= job_.waves_from && cycle_ < job_.waves_to;
        if (dump) fst_.dump(job_.period * cycle_);
#endif
        top_.clk = 1;
        top_.eval();
#if VM_TRACE
        if (dump) fst_.dump(job_.period * cycle_ + job_.period / 2);
#endif
        cycle_++;
    }

    void idle() {
        if (job_.cmd_stall > 0)
            while (uniform_(rng_) < job_.cmd_stall) clock();
    }

    // LOAD_RESET, then the image file's bytes through `load`, each held until the engine takes it
    void load_image() {
        std::ifstream file(job_.load_file, std::ios::binary);
        if (!file) fail("cannot read " + job_.load_file);
        const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
        const uint64_t begin = cycle_;
        command(job_.op_load_reset);
        for (char byte : bytes) {
            idle();
            top_.load___05Fpayload = (uint8_t)byte;
            top_.load___05Fvalid = 1;
            settle_until([this] { return top_.load___05Fready; });
            edge();
            top_.load___05Fvalid = 0;
        }
        char line[96];
        snprintf(line, sizeof line, "loaded %zu %" PRIu64 "\n", bytes.size(), cycle_ - begin);
        out_ += line;
        flush();
    }

    // a command: idle cycles, then valid until the engine takes it
    void command(uint64_t op, uint32_t index = 0, uint32_t arg = 0) {
        idle();
        top_.cmd___05Fpayload = op | ((uint64_t)index << job_.index_shift) | ((uint64_t)arg << job_.arg_shift);
        top_.cmd___05Fvalid = 1;
        settle_until([this] { return top_.cmd___05Fready; });
        edge();
        top_.cmd___05Fvalid = 0;
    }

    void flush() {
        fwrite(out_.data(), 1, out_.size(), stdout);
        fflush(stdout);
        out_.clear();
    }

    const Job& job_;
    Vengine top_;
    std::mt19937_64 rng_;
    std::uniform_real_distribution<double> uniform_{0.0, 1.0};
    uint64_t cycle_ = 0;
    uint32_t step_ = 0;
    std::string out_;
#if VM_TRACE
    VerilatedFstC fst_;
#endif
};

}  // namespace

int main(int argc, char** argv) {
    Job job = read_job(std::cin);
    for (int k = 1; k < argc; k++)
        if (argv[k][0] != '+') job.waves = argv[k];
    if (job.prompt.empty()) fail("empty prompt");
    if (job.steps < 1) fail("steps must be at least 1");
    if (!job.have_cmd || !job.have_result) fail("the job needs the cmd and result encodings");
    VerilatedContext ctx;
    ctx.commandArgs(argc, argv);
#if VM_TRACE
    ctx.traceEverOn(true);
#endif
    {
        Bench bench(ctx, job);
        bench.run();
    }
    return 0;
}
