/* Strict command-line parsing shared by the example programs: an error names the option and its
   value and prints the usage on stderr (exit status 2); --help prints it on stdout (exit 0).
   A program sets ex_prog and ex_usage_text first thing in main. */
#ifndef SELFATTN_EXAMPLES_ARGS_H
#define SELFATTN_EXAMPLES_ARGS_H

#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *ex_prog = "example";
static const char *ex_usage_text = "";

static inline __attribute__((noreturn)) void ex_usage(FILE *f, int status)
{
    fputs(ex_usage_text, f);
    exit(status);
}

static inline __attribute__((format(printf, 1, 2), noreturn)) void ex_bad_usage(const char *fmt,
                                                                                ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", ex_prog);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    ex_usage(stderr, 2);
}

/* The value of option argv[*i]: the next argument, which it consumes. */
static inline const char *ex_opt_value(int argc, char **argv, int *i)
{
    if (*i + 1 >= argc)
        ex_bad_usage("%s needs a value", argv[*i]);
    return argv[++*i];
}

/* The integer value of option argv[*i] (the next argument, which it consumes), in [lo, hi]. */
static inline long ex_int_arg(int argc, char **argv, int *i, long lo, long hi)
{
    const char *opt = argv[*i];
    const char *s = ex_opt_value(argc, argv, i);
    char *end;
    errno = 0;
    const long v = strtol(s, &end, 10);
    if (end == s || *end != '\0')
        ex_bad_usage("%s '%s': not an integer", opt, s);
    if (errno == ERANGE || v < lo || v > hi)
        ex_bad_usage("%s %s: out of range [%ld, %ld]", opt, s, lo, hi);
    return v;
}

/* The library leaves the BLAS's thread count to the program, and runs a call on one worker while
   OpenBLAS runs several threads: a program that wants the library's own workers sets OpenBLAS to
   one thread, as the examples do. Found at run time (dlopen(NULL) searches the program and the
   libraries it loaded, OpenBLAS among them when the library links it), so that any CBLAS works.
   Returns what it did, for the program's output. */
static inline const char *ex_blas_one_thread(void)
{
    void *self = dlopen(NULL, RTLD_LAZY);
    void *set = self != NULL ? dlsym(self, "openblas_set_num_threads") : NULL;
    if (set == NULL)
        return "not OpenBLAS: its threads as the environment sets them";
    void (*set_threads)(int);
    memcpy(&set_threads, &set, sizeof set);
    set_threads(1);
    return "set to 1 thread by this program";
}

#endif
