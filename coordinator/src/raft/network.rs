//! Raft RPCs over a [`Transport`]: the simulator's in-memory network or QUIC in production.

use super::TypeConfig;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory};
use protocol::codec;
use protocol::messages::{Request, Response};
use protocol::transport::{Transport, TransportError};
use protocol::ReplicaId;
use serde::{Deserialize, Serialize};

/// A Raft RPC as it travels inside [`Request::Raft`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
}

/// The answer to a [`RaftRpc`] inside [`Response::Raft`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    AppendEntries(AppendEntriesResponse<u64>),
    Vote(VoteResponse<u64>),
    InstallSnapshot(InstallSnapshotResponse<u64>),
    /// The receiving replica returned an error (e.g. it is shutting down).
    Error(String),
}

/// Encodes a Raft RPC into a transport request.
pub fn raft_request(rpc: &RaftRpc) -> Result<Request, TransportError> {
    codec::encode(rpc).map(Request::Raft).map_err(|e| TransportError::Codec(e.to_string()))
}

/// Creates one [`RaftNetworkClient`] per target replica.
#[derive(Clone)]
pub struct NetworkFactory<T: Transport> {
    pub transport: T,
}

impl<T: Transport> RaftNetworkFactory<TypeConfig> for NetworkFactory<T> {
    type Network = RaftNetworkClient<T>;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        if !node.addr.is_empty() {
            self.transport.learn_peer(target, &node.addr);
        }
        RaftNetworkClient { transport: self.transport.clone(), target }
    }
}

/// Sends Raft RPCs to one replica.
pub struct RaftNetworkClient<T: Transport> {
    transport: T,
    target: ReplicaId,
}

type RpcResult<R, E = openraft::error::Infallible> = Result<R, RPCError<u64, BasicNode, RaftError<u64, E>>>;

impl<T: Transport> RaftNetworkClient<T> {
    async fn send<E: std::error::Error>(&self, rpc: RaftRpc, option: &RPCOption) -> RpcResult<RaftReply, E> {
        let request = raft_request(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let response = self
            .transport
            .call(self.target, request, option.hard_ttl())
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = match response {
            Response::Raft(bytes) => {
                codec::decode::<RaftReply>(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?
            }
            other => {
                let e = TransportError::Codec(format!("unexpected response {other:?}"));
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
        };
        if let RaftReply::Error(reason) = &reply {
            let e = TransportError::Unreachable(reason.clone());
            return Err(RPCError::Network(NetworkError::new(&e)));
        }
        Ok(reply)
    }
}

fn unexpected<E: std::error::Error>(reply: RaftReply) -> RPCError<u64, BasicNode, RaftError<u64, E>> {
    let e = TransportError::Codec(format!("mismatched raft reply {reply:?}"));
    RPCError::Network(NetworkError::new(&e))
}

impl<T: Transport> RaftNetwork<TypeConfig> for RaftNetworkClient<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>> {
        match self.send(RaftRpc::AppendEntries(rpc), &option).await? {
            RaftReply::AppendEntries(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        match self.send(RaftRpc::InstallSnapshot(rpc), &option).await? {
            RaftReply::InstallSnapshot(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<u64>, option: RPCOption) -> RpcResult<VoteResponse<u64>> {
        match self.send(RaftRpc::Vote(rpc), &option).await? {
            RaftReply::Vote(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }
}
