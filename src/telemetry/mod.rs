//! What pgshift tells the outside about itself, apart from how it is served:
//! metric constructors (every metric `pgshift_…`, with help and a unit in its
//! name) and the status board behind `/status`. The admin API (`admin/`)
//! serves both; every other module only registers into them.

pub mod metrics;
pub mod status;
