//! `fieldsync bench conditions`: the idle cost of condition probing and the accuracy of
//! the rate limiter.
