// The simulated board: a Verilated top level `board` (ports clk, rst, rx, tx, running)
// whose UART pins are bridged to a pseudo-terminal.
//
//   board [--divisor N] [--idle-cycles N] [--parent PID] [--bench N]
//         [--link-faults RATE] [--fault-seed N]
//
// Prints the pty's slave path on stdout (one line, nothing else ever goes to stdout),
// then runs the clock: rst is held for the first cycles (rx idle for a few more), bytes
// read from the pty are sent to `rx` as 8N1 at `divisor` cycles per bit (idle high), and
// 8N1 bytes seen on `tx` are written to the pty. When nothing has been in flight in
// either direction for `idle-cycles` cycles and `running` is low, it waits in poll()
// between short bursts of cycles instead of spinning. Exits when the pty's other end is
// closed after having been opened, on SIGTERM/SIGINT, or when idle once it is no longer
// the child of --parent (the host died); it then reports the cycle rate on stderr:
//
//   board: cycles=N seconds=S active_seconds=A cycles_per_second=R
//
// (R = cycles run while not waiting in poll() / A). --bench N runs N cycles with the
// UART idle, without a pty, prints the same line and exits.
//
// --link-faults RATE makes the link unreliable, from a PRNG seeded by --fault-seed (one
// stream per direction): each byte, host -> device and device -> host, is with
// probability RATE bit-flipped (one random bit), dropped or duplicated (one of the three
// at random), and with probability RATE/10 starts a cut (it and the next 0..19 bytes are
// dropped). At exit the counts are reported before the cycle line:
//
//   board: faults h2d flip=N drop=N dup=N cut=N cut_bytes=N d2h flip=N ...

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <termios.h>
#include <unistd.h>

#include "Vboard.h"
#include "verilated.h"

#ifndef BOARD_DIVISOR
#define BOARD_DIVISOR 4
#endif

namespace {

constexpr int RESET_CYCLES = 8;
constexpr uint64_t STARTUP_CYCLES = 64;    // rx idle (high) this long before any byte
constexpr uint64_t SERVICE_CYCLES = 256;   // pty I/O at most once per this many cycles
constexpr int SLEEP_MS = 10;               // poll() timeout while idle
constexpr int IDLE_BURST = 256;            // cycles run between idle polls

volatile std::sig_atomic_t g_stop = 0;

void on_signal(int) { g_stop = 1; }

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
}

struct Board {
    std::unique_ptr<VerilatedContext> ctx;
    std::unique_ptr<Vboard> top;
    uint64_t cycles = 0;

    Board() : ctx(new VerilatedContext), top(new Vboard(ctx.get(), "board")) {
        top->clk = 0;
        top->rst = 1;
        top->rx = 1;
        top->eval();
    }
    ~Board() { top->final(); }

    // One clock cycle with `rx` driven; returns `tx` after the rising edge.
    inline int step(int rx) {
        top->rst = cycles < (uint64_t)RESET_CYCLES;
        top->rx = rx;
        top->clk = 1;
        top->eval();
        top->clk = 0;
        top->eval();
        ++cycles;
        return top->tx;
    }
};

// Host -> device: 8N1 serializer on `rx`.
struct Serializer {
    int divisor;
    std::deque<uint8_t> queue;
    int bit = -1;        // -1 idle; 0 start, 1..8 data, 9 stop
    int count = 0;       // cycles left in this bit
    uint16_t frame = 0;

    // The level of rx for this cycle.
    inline int next() {
        if (bit < 0) {
            if (queue.empty()) return 1;
            uint8_t byte = queue.front();
            queue.pop_front();
            frame = (uint16_t)((1u << 9) | ((unsigned)byte << 1));  // start 0, data, stop 1
            bit = 0;
            count = divisor;
        }
        int level = (frame >> bit) & 1;
        if (--count == 0) {
            count = divisor;
            if (++bit == 10) bit = -1;
        }
        return level;
    }
    bool busy() const { return bit >= 0 || !queue.empty(); }
};

// Device -> host: 8N1 deserializer on `tx`, sampling mid-bit.
struct Deserializer {
    int divisor;
    int prev = 1;
    int bit = -1;        // -1 hunting a falling edge
    int count = 0;       // cycles until the next sample
    unsigned data = 0;
    uint64_t framing_errors = 0;

    // Feeds one cycle's tx; returns the received byte or -1.
    inline int feed(int tx) {
        int out = -1;
        if (bit < 0) {
            if (prev && !tx) {               // start bit begins this cycle
                bit = 0;
                count = divisor / 2;         // middle of the start bit (this cycle is 1st)
                if (count == 0) count = 1;
                data = 0;
            }
        }
        if (bit >= 0 && --count == 0) {
            if (bit == 0) {
                if (tx) { bit = -1; prev = tx; return -1; }  // glitch, not a start bit
            } else if (bit <= 8) {
                data |= (unsigned)tx << (bit - 1);
            } else {
                if (!tx) ++framing_errors;
                out = (int)data;
                bit = -1;
                prev = tx;
                return out;
            }
            ++bit;
            count = divisor;
        }
        prev = tx;
        return out;
    }
    bool busy() const { return bit >= 0; }
};

// Byte faults of one direction of the link (see the header).
struct Faults {
    double rate = 0;
    uint64_t state = 1;
    uint64_t flip = 0, drop = 0, dup = 0, cut = 0, cut_bytes = 0;
    int cutting = 0;     // bytes of the current cut still to drop

    Faults(double r, uint64_t seed) : rate(r) {
        // splitmix64 of the seed: never zero for xorshift
        uint64_t z = seed + 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        state = (z ^ (z >> 31)) | 1;
    }
    uint64_t next() {    // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        return state * 2685821657736338717ull;
    }
    double uniform() { return (double)(next() >> 11) * (1.0 / 9007199254740992.0); }

    // Passes `byte` through the faults to `push` (zero, one or two bytes).
    template <class Push>
    void apply(uint8_t byte, Push push) {
        if (rate <= 0) { push(byte); return; }
        if (cutting > 0) { --cutting; ++cut_bytes; return; }
        if (uniform() < rate / 10) {
            ++cut;
            ++cut_bytes;
            cutting = (int)(next() % 20);
            return;
        }
        if (uniform() < rate) {
            switch (next() % 3) {
            case 0: ++flip; push((uint8_t)(byte ^ (1u << (next() % 8)))); return;
            case 1: ++drop; return;
            default: ++dup; push(byte); push(byte); return;
            }
        }
        push(byte);
    }
    void print(const char* name) const {
        std::fprintf(stderr, " %s flip=%llu drop=%llu dup=%llu cut=%llu cut_bytes=%llu", name,
                     (unsigned long long)flip, (unsigned long long)drop, (unsigned long long)dup,
                     (unsigned long long)cut, (unsigned long long)cut_bytes);
    }
};

void report(const Board& b, Clock::time_point start, double waited) {
    double total = seconds_since(start);
    double active = total - waited;
    if (active <= 0) active = 1e-9;
    std::fprintf(stderr, "board: cycles=%llu seconds=%.3f active_seconds=%.3f cycles_per_second=%.0f\n",
                 (unsigned long long)b.cycles, total, active, (double)b.cycles / active);
    std::fflush(stderr);
}

int open_pty(std::string& path) {
    int fd = posix_openpt(O_RDWR | O_NOCTTY);
    if (fd < 0) { std::perror("board: posix_openpt"); return -1; }
    if (grantpt(fd) != 0 || unlockpt(fd) != 0) { std::perror("board: grantpt/unlockpt"); return -1; }
    const char* name = ptsname(fd);
    if (!name) { std::perror("board: ptsname"); return -1; }
    path = name;
    // Raw mode (no echo, no line editing, no CR/LF translation), set on the slave. Opening
    // and closing the slave here also puts the master in the hung-up state (read: EIO,
    // poll: POLLHUP) on every kernel, whatever it reports before a first open, so the
    // first read that is not EIO means a client has opened it.
    struct termios tio;
    int slave = open(name, O_RDWR | O_NOCTTY);
    if (slave >= 0) {
        if (tcgetattr(slave, &tio) == 0) {
            cfmakeraw(&tio);
            tcsetattr(slave, TCSANOW, &tio);
        }
        close(slave);
    } else if (tcgetattr(fd, &tio) == 0) {
        cfmakeraw(&tio);
        tcsetattr(fd, TCSANOW, &tio);
    }
    int flags = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    return fd;
}

// The value after option argv[i] (i moves onto it), or exit 2 when there is none.
const char* option_value(int& i, int argc, char** argv) {
    if (i + 1 >= argc) {
        std::fprintf(stderr, "board: %s needs a value\n", argv[i]);
        std::exit(2);
    }
    return argv[++i];
}

[[noreturn]] void bad_value(char** argv, int i, const char* what) {
    std::fprintf(stderr, "board: bad value for %s: %s%s\n", argv[i - 1], argv[i], what);
    std::exit(2);
}

long parse_arg(int& i, int argc, char** argv) {
    char* end;
    long v = std::strtol(option_value(i, argc, argv), &end, 0);
    if (*end || v <= 0) bad_value(argv, i, "");
    return v;
}

double parse_rate(int& i, int argc, char** argv) {
    char* end;
    double v = std::strtod(option_value(i, argc, argv), &end);
    if (*end || !(v >= 0 && v <= 1)) bad_value(argv, i, " (a rate in 0..1)");
    return v;
}

uint64_t parse_seed(int& i, int argc, char** argv) {
    char* end;
    const char* text = option_value(i, argc, argv);
    unsigned long long v = std::strtoull(text, &end, 0);
    if (*end || !*text) bad_value(argv, i, "");
    return (uint64_t)v;
}

}  // namespace

int main(int argc, char** argv) {
    int divisor = BOARD_DIVISOR;
    uint64_t idle_cycles = 50000;
    uint64_t bench = 0;
    pid_t parent = 0;
    double fault_rate = 0;
    uint64_t fault_seed = 0;
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--divisor")) divisor = (int)parse_arg(i, argc, argv);
        else if (!std::strcmp(argv[i], "--idle-cycles")) idle_cycles = parse_arg(i, argc, argv);
        else if (!std::strcmp(argv[i], "--bench")) bench = parse_arg(i, argc, argv);
        else if (!std::strcmp(argv[i], "--parent")) parent = (pid_t)parse_arg(i, argc, argv);
        else if (!std::strcmp(argv[i], "--link-faults")) fault_rate = parse_rate(i, argc, argv);
        else if (!std::strcmp(argv[i], "--fault-seed")) fault_seed = parse_seed(i, argc, argv);
        else { std::fprintf(stderr, "board: unknown argument %s\n", argv[i]); return 2; }
    }

    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, nullptr);
    sigaction(SIGINT, &sa, nullptr);
    std::signal(SIGPIPE, SIG_IGN);

    Board board;
    auto start = Clock::now();
    double waited = 0;

    if (bench) {
        for (uint64_t n = 0; n < bench && !g_stop; ++n) board.step(1);
        report(board, start, 0);
        return 0;
    }

    std::string path;
    int fd = open_pty(path);
    if (fd < 0) return 1;
    std::printf("%s\n", path.c_str());
    std::fflush(stdout);

    Serializer ser{divisor};
    Deserializer des{divisor};
    Faults h2d(fault_rate, fault_seed), d2h(fault_rate, ~fault_seed);
    std::vector<uint8_t> out;
    std::vector<uint8_t> buf(4096);
    bool seen_open = false;
    bool hangup = false;
    uint64_t last_activity = 0;

    // Returns false when the pty's other end has gone after having been opened.
    auto service = [&]() -> bool {
        if (!out.empty()) {
            ssize_t n = write(fd, out.data(), out.size());
            if (n > 0) out.erase(out.begin(), out.begin() + n);
            else if (n < 0 && errno != EAGAIN && errno != EINTR) out.clear();  // nobody there
        }
        if (ser.queue.size() < 64) {
            ssize_t n = read(fd, buf.data(), buf.size());
            if (n > 0) {
                seen_open = true;
                for (ssize_t k = 0; k < n; ++k)
                    h2d.apply(buf[k], [&](uint8_t b) { ser.queue.push_back(b); });
            } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                seen_open = true;                    // a client has the slave open
            } else if (n < 0 && errno == EIO) {      // nobody has the slave open
                if (seen_open) return false;
            }
        }
        return true;
    };

    bool sleeping = false;
    while (!g_stop) {
        if (sleeping) {
            if (parent && getppid() != parent) break;   // orphaned: the host died
            struct pollfd p = {fd, POLLIN, 0};
            auto t0 = Clock::now();
            int r = poll(&p, 1, SLEEP_MS);
            waited += seconds_since(t0);
            if (r > 0 && (p.revents & POLLHUP)) {
                if (seen_open) { hangup = true; break; }
                // Nobody has opened it yet (open_pty's own open and close leaves it hung
                // up on every kernel): POLLHUP stays until then, so sleep properly.
                auto t1 = Clock::now();
                usleep(SLEEP_MS * 1000);
                waited += seconds_since(t1);
            } else if (r > 0 && (p.revents & POLLIN)) {
                seen_open = true;
            }
        }
        if (!service()) { hangup = true; break; }
        if (ser.busy()) { sleeping = false; last_activity = board.cycles; }
        uint64_t burst = sleeping ? IDLE_BURST : SERVICE_CYCLES;
        for (uint64_t n = 0; n < burst; ++n) {
            int tx = board.step(board.cycles < STARTUP_CYCLES ? 1 : ser.next());
            int byte = des.feed(tx);
            if (byte >= 0) d2h.apply((uint8_t)byte, [&](uint8_t b) { out.push_back(b); });
        }
        if (ser.busy() || des.busy() || !out.empty() || board.top->running ||
            board.cycles <= STARTUP_CYCLES) {
            last_activity = board.cycles;
            sleeping = false;
        } else if (board.cycles - last_activity >= idle_cycles) {
            sleeping = true;
        }
    }
    if (!out.empty() && !hangup) service();
    if (des.framing_errors)
        std::fprintf(stderr, "board: %llu framing errors on tx\n",
                     (unsigned long long)des.framing_errors);
    if (fault_rate > 0) {
        std::fprintf(stderr, "board: faults");
        h2d.print("h2d");
        d2h.print("d2h");
        std::fprintf(stderr, "\n");
    }
    report(board, start, waited);
    close(fd);
    return 0;
}
