/* A small C interface to Google Benchmark, so that benchmark bodies are plain C calling the
   public API like any C user. One C++ file (shim.cc) implements it. */
#ifndef SELFATTN_BENCH_SHIM_H
#define SELFATTN_BENCH_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sb_state sb_state; /* a benchmark::State */
typedef void (*sb_fn)(sb_state *s, const void *arg);

/* The timing loop: while (sb_keep_running(s)) { ...timed work... } */
int sb_keep_running(sb_state *s);
void sb_pause(sb_state *s);
void sb_resume(sb_state *s);
int64_t sb_iterations(const sb_state *s);
void sb_skip_with_error(sb_state *s, const char *msg);

/* Counters. A rate counter is given the total over all iterations and reported per second of
   real time; a plain counter is reported as given. */
void sb_counter_rate(sb_state *s, const char *name, double total);
void sb_counter(sb_state *s, const char *name, double value);
void sb_items_processed(sb_state *s, int64_t items);
void sb_bytes_processed(sb_state *s, int64_t bytes);
void sb_label(sb_state *s, const char *label);

/* Registers fn(state, arg) under name; timed in real (wall-clock) time, since the library runs
   worker threads. iterations > 0 fixes the iteration count. */
void sb_register(const char *name, sb_fn fn, const void *arg, int64_t iterations);

/* If the command line has --smoke (a quick pass for CI: not a timed test), replaces it with a tiny
   --benchmark_min_time and returns 1; else returns 0. */
int sb_smoke(int argc, char **argv);

/* If the command line has PREFIX followed by a comma-separated list of positive integers (e.g.
   "--seq=" and "--seq=512,1024"), stores up to max of them in out, replaces the argument with a
   harmless --benchmark_color=false (so that Google Benchmark does not reject it) and returns how
   many it stored; else returns 0. A malformed list is a fatal usage error. */
int sb_int_list(int argc, char **argv, const char *prefix, int *out, int max);

/* Timing helpers for benchmarks that time pairs of calls themselves: a monotonic clock in
   seconds, and the median of n values (sorts v in place). */
double sb_now_s(void);
double sb_median(double *v, int n);

/* A pair measured side by side: a(ca) and b(cb) each once as a warm-up, then in turn while the
   benchmark runs, which goes first alternating so that neither always runs on the other's warm
   caches; a call returning non-zero ends the loop. Medians of each (over the first 4096 pairs)
   in *ta and *tb. Returns 0, the first non-zero a call returned, or -1 when no pair ran. */
typedef int (*sb_call_fn)(void *ctx);
int sb_alternate(sb_state *s, sb_call_fn a, void *ca, sb_call_fn b, void *cb, double *ta,
                 double *tb);

/* The process's resident high-water mark in MiB (VmHWM; -1 where /proc cannot tell), and its
   reset (through /proc/self/clear_refs). */
double sb_peak_rss_mib(void);
void sb_reset_peak_rss(void);

/* n floats uniform in [-amp, amp) (65536 levels), from a linear congruential sequence started at
   seed: the same values on every run, so that every run of a benchmark feeds the same data.
   Random rather than constant data, since sgemm on constant inputs runs a few percent faster.
   sb_fill writes them to p; sb_filled returns them in a new malloc'd buffer (NULL on failure; at
   least one float, so that n = 0 is not a failure). */
void sb_fill(float *p, size_t n, float amp, unsigned seed);
float *sb_filled(size_t n, float amp, unsigned seed);

/* A key and value for the "context" object of the JSON output (and the console header); call
   before sb_main. */
void sb_context(const char *key, const char *value);

/* Initialises Google Benchmark from the command line and runs the registered benchmarks. */
int sb_main(int argc, char **argv);

#ifdef __cplusplus
}
#endif

#endif
