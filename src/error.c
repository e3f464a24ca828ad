/* Statuses and their texts (selfattn_status_string), and selfattn_last_error: a thread-local
 * message for the most recent failing call on this thread. Every status-returning entry point names
 * itself first (sa_err_begin); the first check that fails in the call writes the message (sa_fail
 * with the argument and its values, or SA_CHECK's text of the condition), and the checks that pass
 * the status on leave it as it is. A call that succeeds does not touch the message. */
#include <stdarg.h>
#include <stdio.h>

#include "internal.h"

static _Thread_local const char *sa_err_fn = "selfattn";
static _Thread_local int sa_err_pending; /* a message was written in the current call */
static _Thread_local char sa_err_msg[384];

const char *selfattn_status_string(selfattn_status s)
{
    switch (s) {
    case SELFATTN_OK:
        return "success";
    case SELFATTN_ERR_NULL:
        return "a required pointer argument is NULL";
    case SELFATTN_ERR_INVALID:
        return "a dimension, option, value or element count is out of range or inconsistent";
    case SELFATTN_ERR_NOMEM:
        return "memory could not be allocated";
    case SELFATTN_ERR_OVERFLOW:
        return "a size computed from the arguments does not fit";
    case SELFATTN_ERR_STATE:
        return "not allowed in the layer's current state";
    case SELFATTN_ERR_UNSUPPORTED:
        return "a valid request this build cannot serve";
    }
    return "unknown status code";
}

void sa_err_begin(const char *fn)
{
    sa_err_fn = fn;
    sa_err_pending = 0;
}

selfattn_status sa_fail(selfattn_status st, const char *fmt, ...)
{
    if (sa_err_pending)
        return st;
    va_list ap;
    va_start(ap, fmt);
    const int n = snprintf(sa_err_msg, sizeof sa_err_msg, "%s: ", sa_err_fn);
    const size_t at = n > 0 && (size_t)n < sizeof sa_err_msg ? (size_t)n : 0;
    /* clang-analyzer 14 loses track of va_start across the branch above (a false report) */
    vsnprintf(sa_err_msg + at, sizeof sa_err_msg - at, fmt, ap); // NOLINT(clang-analyzer-valist.*)
    va_end(ap);
    sa_err_pending = 1;
    return st;
}

selfattn_status sa_fail_check(selfattn_status st, const char *cond)
{
    return sa_fail(st, "%s (failed check: %s)", selfattn_status_string(st), cond);
}

const char *selfattn_last_error(void)
{
    return sa_err_msg;
}
