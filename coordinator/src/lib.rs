//! coca's control plane: rendezvous, rank assignment, the shard plan,
//! checkpoint commits and the status endpoint. Never links burn.
