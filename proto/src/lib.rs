//! graft's wire API. Generated code lives only here; the server converts these types to its
//! domain types at the edge (`graft_server::grpc`) and nothing deeper sees them.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("graft.v1");
}

/// Encoded `FileDescriptorSet` of every graft proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("graft_descriptor");
