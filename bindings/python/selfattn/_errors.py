"""Exceptions: one class per selfattn_status, each carrying .status and the library's text."""
from . import _lib


def status_string(status):
    """The library's text for a status code (selfattn_status_string; never fails)."""
    s = _lib.lib.selfattn_status_string(int(status))
    return s.decode("utf-8", "replace") if s is not None else "unknown status"


class Error(Exception):
    """A libselfattn call failed. `.status` is the selfattn_status code (int), `.status_string`
    the library's text for it, `.function` the C function (or binding method) that failed."""

    #: the code of this class (subclasses); the base class is used for codes it does not know
    code = None

    def __init__(self, status, function=None, detail=None):
        self.status = int(status)
        self.status_string = status_string(self.status)
        self.function = function
        self.detail = detail
        msg = "%s (status %d)" % (self.status_string, self.status)
        if function:
            msg = "%s: %s" % (function, msg)
        if detail:
            msg = "%s: %s" % (msg, detail)
        super().__init__(msg)

    def __reduce__(self):
        return (_rebuild, (self.status, self.function, self.detail))


class NullError(Error):
    """SELFATTN_ERR_NULL: a required pointer was NULL (cannot happen through this binding)."""
    code = _lib.ERR_NULL


class InvalidError(Error, ValueError):
    """SELFATTN_ERR_INVALID: a dimension, option, value or element count is out of range or
    inconsistent. Also a ValueError."""
    code = _lib.ERR_INVALID


class NoMemoryError(Error, MemoryError):
    """SELFATTN_ERR_NOMEM: the library could not allocate memory. Also a MemoryError."""
    code = _lib.ERR_NOMEM


class SizeOverflowError(Error, OverflowError):
    """SELFATTN_ERR_OVERFLOW: a size computed from the arguments does not fit (also raised by the
    binding for a size that does not fit the C function's int32_t). Also an OverflowError."""
    code = _lib.ERR_OVERFLOW


class StateError(Error, RuntimeError):
    """SELFATTN_ERR_STATE: not allowed in the handle's current state (e.g. a required weight not
    set, a shape option after a weight). Also a RuntimeError."""
    code = _lib.ERR_STATE


class UnsupportedError(Error, NotImplementedError):
    """SELFATTN_ERR_UNSUPPORTED: a valid request the loaded library cannot serve. Also raised by
    the binding when a feature needs a newer library (a missing function or option)."""
    code = _lib.ERR_UNSUPPORTED


_BY_CODE = {c.code: c for c in (NullError, InvalidError, NoMemoryError, SizeOverflowError,
                                StateError, UnsupportedError)}


def library_message():
    """selfattn_last_error(): the library's message for this thread's most recent failing call."""
    m = _lib.lib.selfattn_last_error()
    return m.decode("utf-8", "replace") if m else ""


def error_for(status, function=None, detail=None, from_library=False):
    """The exception instance for a non-zero status (Error itself for a code added later). With
    from_library (the status came from a C call just made), the library's own message, which
    names the check and the argument's values, is part of the text (.library_message)."""
    lib_msg = library_message() if from_library else ""
    if lib_msg and detail and lib_msg not in detail:
        detail = "%s [%s]" % (detail, lib_msg)
    elif lib_msg:
        detail = lib_msg
    e = _BY_CODE.get(int(status), Error)(status, function, detail)
    e.library_message = lib_msg
    return e


def _rebuild(status, function, detail):
    return error_for(status, function, detail)


def unsupported(what, needs="libselfattn 1.1"):
    return UnsupportedError(_lib.ERR_UNSUPPORTED, None,
                            "%s needs %s; the loaded library is %s (%s)"
                            % (what, needs, _lib.lib.selfattn_version_string().decode(), _lib.path))
