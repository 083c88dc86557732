//! The ingress modules compiled on their own, so the fuzz targets exercise
//! exactly the shipped source without building the rest of tickgate.

#[path = "../../src/ingress/signature.rs"]
pub mod signature;

#[path = "../../src/ingress/client_ip.rs"]
pub mod client_ip;

#[path = "../../src/ingress/body.rs"]
pub mod body;
