//! Host-side client (in progress).
