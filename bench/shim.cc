// The C shim over Google Benchmark (see shim.h).
#include "shim.h"

#include <algorithm>
#include <chrono>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <benchmark/benchmark.h>

// sb_state is never defined: an sb_state * is a benchmark::State * under another name.
static benchmark::State &S(sb_state *s)
{
    return *reinterpret_cast<benchmark::State *>(s);
}

extern "C" {

int sb_keep_running(sb_state *s)
{
    return S(s).KeepRunning() ? 1 : 0;
}

void sb_pause(sb_state *s)
{
    S(s).PauseTiming();
}

void sb_resume(sb_state *s)
{
    S(s).ResumeTiming();
}

int64_t sb_iterations(const sb_state *s)
{
    return static_cast<int64_t>(reinterpret_cast<const benchmark::State *>(s)->iterations());
}

void sb_skip_with_error(sb_state *s, const char *msg)
{
    S(s).SkipWithError(msg);
}

void sb_counter_rate(sb_state *s, const char *name, double total)
{
    S(s).counters[name] = benchmark::Counter(total, benchmark::Counter::kIsRate);
}

void sb_counter(sb_state *s, const char *name, double value)
{
    S(s).counters[name] = benchmark::Counter(value);
}

void sb_items_processed(sb_state *s, int64_t items)
{
    S(s).SetItemsProcessed(items);
}

void sb_bytes_processed(sb_state *s, int64_t bytes)
{
    S(s).SetBytesProcessed(bytes);
}

void sb_label(sb_state *s, const char *label)
{
    S(s).SetLabel(label);
}

void sb_register(const char *name, sb_fn fn, const void *arg, int64_t iterations)
{
    auto *b = benchmark::RegisterBenchmark(name, [fn, arg](benchmark::State &st) {
        fn(reinterpret_cast<sb_state *>(&st), arg);
    });
    b->UseRealTime()->Unit(benchmark::kMicrosecond);
    if (iterations > 0)
        b->Iterations(iterations);
}

int sb_smoke(int argc, char **argv)
{
    static char min_time[] = "--benchmark_min_time=0.01";
    int found = 0;
    for (int i = 1; i < argc; i++)
        if (std::strcmp(argv[i], "--smoke") == 0) {
            argv[i] = min_time;
            found = 1;
        }
    return found;
}

int sb_int_list(int argc, char **argv, const char *prefix, int *out, int max)
{
    static char neutral[] = "--benchmark_color=false";
    const size_t plen = std::strlen(prefix);
    for (int i = 1; i < argc; i++) {
        if (std::strncmp(argv[i], prefix, plen) != 0)
            continue;
        int n = 0;
        const char *p = argv[i] + plen;
        while (*p && n < max) {
            char *end = nullptr;
            const long v = std::strtol(p, &end, 10);
            if (end == p || v <= 0 || v > 1L << 24 || (*end != ',' && *end != '\0')) {
                std::fprintf(stderr, "%s: expected %sN[,N...] with positive integers\n", argv[0],
                             prefix);
                std::exit(2);
            }
            out[n++] = static_cast<int>(v);
            p = *end ? end + 1 : end;
        }
        argv[i] = neutral;
        return n;
    }
    return 0;
}

void sb_context(const char *key, const char *value)
{
    benchmark::AddCustomContext(key, value);
}

int sb_main(int argc, char **argv)
{
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv))
        return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}

} // extern "C"

double sb_now_s(void)
{
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

double sb_median(double *v, int n)
{
    std::sort(v, v + n);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int sb_alternate(sb_state *s, sb_call_fn a, void *ca, sb_call_fn b, void *cb, double *ta,
                 double *tb)
{
    enum { PAIRS = 4096 };
    static double va[PAIRS], vb[PAIRS];
    int st = a(ca);
    if (st == 0)
        st = b(cb);
    int k = 0;
    while (st == 0 && sb_keep_running(s)) {
        const int a_first = k % 2 == 0;
        const double t0 = sb_now_s();
        st = a_first ? a(ca) : b(cb);
        const double t1 = sb_now_s();
        if (st == 0)
            st = a_first ? b(cb) : a(ca);
        const double t2 = sb_now_s();
        if (k < PAIRS) {
            va[k] = a_first ? t1 - t0 : t2 - t1;
            vb[k] = a_first ? t2 - t1 : t1 - t0;
        }
        k++;
    }
    if (st != 0)
        return st;
    if (k == 0)
        return -1;
    const int m = k < PAIRS ? k : PAIRS;
    *ta = sb_median(va, m);
    *tb = sb_median(vb, m);
    return 0;
}

void sb_fill(float *p, size_t n, float amp, unsigned seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = amp * (static_cast<float>((seed >> 9) & 0xffff) / 32768.0f - 1.0f);
    }
}

float *sb_filled(size_t n, float amp, unsigned seed)
{
    float *p = static_cast<float *>(std::malloc((n ? n : 1) * sizeof *p));
    if (p)
        sb_fill(p, n, amp, seed);
    return p;
}

double sb_peak_rss_mib(void)
{
    FILE *f = std::fopen("/proc/self/status", "r");
    char line[256];
    double kib = -1;
    while (f && std::fgets(line, sizeof line, f))
        if (std::strncmp(line, "VmHWM:", 6) == 0)
            kib = std::strtod(line + 6, nullptr);
    if (f)
        std::fclose(f);
    return kib < 0 ? -1.0 : kib / 1024.0;
}

void sb_reset_peak_rss(void)
{
    FILE *f = std::fopen("/proc/self/clear_refs", "w");
    if (f) {
        std::fputs("5", f);
        std::fclose(f);
    }
}
