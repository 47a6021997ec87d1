//! Privacy accountants (in progress).
