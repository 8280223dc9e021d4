//! The node registry: who may act, in which role, and whether they are suspended.

use crate::audit;
use crate::auth::Caller;
use crate::error::{BrokerError, Result};
use crate::ids::{self, CreditCodeCheck, NodeId};
use crate::pki::role_name;
use crate::store::{Store, T};
use crate::time::now_ts;
use govshare_proto::v1::{
    ListNodesResponse, Node, NodeRole, NodeState, RegisterNodeRequest, RegisterNodeResponse,
};

/// Default and largest page sizes for listings.
const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1000;

/// Clamps a requested page size.
pub fn page_size(requested: u32, default: usize, max: usize) -> usize {
    match requested as usize {
        0 => default,
        n => n.min(max),
    }
}

/// Node registry operations. Blocking: call from blocking threads.
#[derive(Debug, Clone)]
pub struct Registry {
    store: Store,
}

impl Registry {
    /// A registry over the store.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Registers the broker's own node and its admin at start, so the admin identity works at once.
    pub fn bootstrap(&self, broker_id: &str, admin_id: &str) -> Result<()> {
        for (id, role, name) in [
            (broker_id, NodeRole::Broker, "this broker"),
            (admin_id, NodeRole::Admin, "broker administrator"),
        ] {
            if self.store.get::<Node>(T::Nodes, id)?.is_some() {
                continue;
            }
            let node = NodeId::parse(id, "bootstrap node id")?;
            let record = Node {
                id: id.to_string(),
                name: name.to_string(),
                region: node.region().to_string(),
                role: role as i32,
                state: NodeState::Active as i32,
                registered_at: Some(now_ts()),
                updated_at: Some(now_ts()),
                registered_by: broker_id.to_string(),
                home_broker: broker_id.to_string(),
                ..Default::default()
            };
            self.store.write(|tx| {
                tx.put(T::Nodes, id, &record)?;
                let mut e = audit::entry("node_registered", broker_id);
                e.subject = id.to_string();
                e.reason = format!("bootstrap ({})", role_name(role));
                Ok(((), vec![e]))
            })?;
        }
        Ok(())
    }

    /// Checks that a certificate's node is registered, active and in the certificate's role.
    pub fn authenticate(&self, cert: &crate::pki::CertIdentity) -> Result<Node> {
        let (node_id, cert_role) = (&cert.node_id, cert.role);
        let node: Node = self.store.get(T::Nodes, node_id.as_str())?.ok_or_else(|| {
            BrokerError::denied(format!(
                "node {node_id} is not registered on this broker; ask its admin to run `govshare node register --id {node_id} ...`"
            ))
        })?;
        if node.state() == NodeState::Suspended {
            return Err(BrokerError::denied(format!("node {node_id} is suspended")));
        }
        if !node.certificate_sha256.is_empty() && node.certificate_sha256 != cert.sha256 {
            return Err(BrokerError::Unauthenticated(format!(
                "this certificate for {node_id} has been replaced (re-issued); only the certificate pinned by an admin is accepted"
            )));
        }
        if node.role() != cert_role {
            return Err(BrokerError::denied(format!(
                "node {node_id} is registered as {} but its certificate says {}",
                role_name(node.role()),
                role_name(cert_role)
            )));
        }
        Ok(node)
    }

    /// Checks a child broker's link certificate. A child need not be registered here; one that
    /// is (role broker) obeys suspension and a pinned certificate like any node, which is how
    /// an operator shuts out a stolen link identity.
    pub fn check_link(&self, cert: &crate::pki::CertIdentity) -> Result<()> {
        let Some(node) = self.store.get::<Node>(T::Nodes, cert.node_id.as_str())? else {
            return Ok(());
        };
        let id = &cert.node_id;
        if node.role() != NodeRole::Broker {
            return Err(BrokerError::denied(format!(
                "{id} is registered here as a {}, not a broker; it cannot open a link",
                role_name(node.role())
            )));
        }
        if node.state() == NodeState::Suspended {
            return Err(BrokerError::denied(format!(
                "child broker {id} is suspended here"
            )));
        }
        if !node.certificate_sha256.is_empty() && node.certificate_sha256 != cert.sha256 {
            return Err(BrokerError::Unauthenticated(format!(
                "this link certificate for {id} has been replaced (re-issued); only the certificate pinned by an admin is accepted"
            )));
        }
        Ok(())
    }

    /// Registers a node (admin only).
    pub fn register(
        &self,
        caller: &Caller,
        req: RegisterNodeRequest,
    ) -> Result<RegisterNodeResponse> {
        caller.require_admin("register nodes")?;
        let id = NodeId::parse(&req.id, "node id")?;
        ids::check_text("name", &req.name, true, 200)?;
        ids::check_text("contact", &req.contact, false, 500)?;
        let role = match NodeRole::try_from(req.role) {
            Ok(NodeRole::Unspecified) => NodeRole::Department,
            Ok(r) => r,
            Err(_) => {
                return Err(BrokerError::invalid(format!(
                    "role {} is not a NodeRole",
                    req.role
                )))
            }
        };
        let mut warnings = Vec::new();
        let credit_code = req.credit_code.trim().to_uppercase();
        let mut credit_code_valid = false;
        if !credit_code.is_empty() {
            match ids::check_credit_code(&credit_code)? {
                CreditCodeCheck::Valid => credit_code_valid = true,
                CreditCodeCheck::BadCheckDigit => warnings.push(format!(
                    "credit code {credit_code} fails the GB 32100 check digit; kept as given, please verify it"
                )),
            }
        }
        let node = Node {
            id: id.to_string(),
            name: req.name.trim().to_string(),
            region: id.region().to_string(),
            role: role as i32,
            credit_code,
            credit_code_valid,
            contact: req.contact.trim().to_string(),
            state: NodeState::Active as i32,
            registered_at: Some(now_ts()),
            registered_by: caller.id.to_string(),
            updated_at: Some(now_ts()),
            home_broker: self.store.broker_id().to_string(),
            certificate_sha256: String::new(),
        };
        self.store.write(|tx| {
            if tx.get::<Node>(T::Nodes, id.as_str())?.is_some() {
                return Err(BrokerError::AlreadyExists(format!(
                    "node {id} is already registered"
                )));
            }
            tx.put(T::Nodes, id.as_str(), &node)?;
            let mut e = audit::entry("node_registered", caller.id.as_str());
            e.subject = id.to_string();
            e.reason = role_name(role).to_string();
            Ok(((), vec![e]))
        })?;
        Ok(RegisterNodeResponse {
            node: Some(node),
            warnings,
        })
    }

    /// Returns one node.
    pub fn get(&self, id: &str) -> Result<Node> {
        let id = NodeId::parse(id, "node id")?;
        self.store
            .get(T::Nodes, id.as_str())?
            .ok_or_else(|| BrokerError::not_found(format!("node {id} is not registered")))
    }

    /// Lists nodes by region prefix (admin only).
    pub fn list(
        &self,
        caller: &Caller,
        region_prefix: &str,
        page: u32,
        token: &str,
    ) -> Result<ListNodesResponse> {
        caller.require_admin("list nodes")?;
        ids::check_region_prefix(region_prefix)?;
        let size = page_size(page, PAGE_DEFAULT, PAGE_MAX);
        let mut nodes = Vec::new();
        let mut next = String::new();
        for kv in self
            .store
            .tree(T::Nodes)
            .scan_prefix(region_prefix.as_bytes())
        {
            let (k, v) = kv?;
            if !token.is_empty() && k.as_ref() <= token.as_bytes() {
                continue;
            }
            if nodes.len() == size {
                next = nodes
                    .last()
                    .map(|n: &Node| n.id.clone())
                    .unwrap_or_default();
                break;
            }
            nodes.push(prost::Message::decode(v.as_ref())?);
        }
        Ok(ListNodesResponse {
            nodes,
            next_page_token: next,
        })
    }

    /// Suspends or resumes a node (admin only).
    pub fn set_state(
        &self,
        caller: &Caller,
        id: &str,
        state: NodeState,
        reason: &str,
    ) -> Result<Node> {
        caller.require_admin("suspend or resume nodes")?;
        let id = NodeId::parse(id, "node id")?;
        ids::check_text("reason", reason, false, 1000)?;
        if id == caller.id && state == NodeState::Suspended {
            return Err(BrokerError::precondition(
                "an admin cannot suspend its own node; use another admin identity",
            ));
        }
        self.store.write(|tx| {
            let mut node: Node = tx
                .get(T::Nodes, id.as_str())?
                .ok_or_else(|| BrokerError::not_found(format!("node {id} is not registered")))?;
            node.state = state as i32;
            node.updated_at = Some(now_ts());
            tx.put(T::Nodes, id.as_str(), &node)?;
            let decision = if state == NodeState::Suspended {
                "node_suspended"
            } else {
                "node_resumed"
            };
            let mut e = audit::entry(decision, caller.id.as_str());
            e.subject = id.to_string();
            e.reason = reason.to_string();
            Ok((node, vec![e]))
        })
    }

    /// Accepts only `pem`'s certificate for node `id` from now on (admin only): it must name
    /// the node in its registered role and verify against `client_ca` now. Grants, demands and
    /// state stay as they are; they belong to the node id, not to a certificate.
    pub fn pin_certificate(
        &self,
        caller: &Caller,
        id: &str,
        pem: &str,
        client_ca: &[u8],
        reason: &str,
    ) -> Result<Node> {
        caller.require_admin("pin node certificates")?;
        let id = NodeId::parse(id, "node id")?;
        ids::check_text("reason", reason, false, 1000)?;
        let der = crate::pki::verify_client_pem(pem.as_bytes(), client_ca)?;
        let cert = crate::pki::identity_from_der(&der)
            .map_err(|e| BrokerError::invalid(format!("certificate_pem: {e}")))?;
        if cert.node_id != id {
            return Err(BrokerError::invalid(format!(
                "certificate_pem names {}, not {id}",
                cert.node_id
            )));
        }
        if id == caller.id {
            return Err(BrokerError::precondition(
                "an admin cannot pin its own certificate; use another admin identity",
            ));
        }
        self.store.write(|tx| {
            let mut node: Node = tx
                .get(T::Nodes, id.as_str())?
                .ok_or_else(|| BrokerError::not_found(format!("node {id} is not registered")))?;
            if node.role() != cert.role {
                return Err(BrokerError::invalid(format!(
                    "certificate_pem is for the {} role; {id} is registered as {}",
                    role_name(cert.role),
                    role_name(node.role())
                )));
            }
            node.certificate_sha256 = cert.sha256.clone();
            node.updated_at = Some(now_ts());
            tx.put(T::Nodes, id.as_str(), &node)?;
            let mut e = audit::entry("certificate_pinned", caller.id.as_str());
            e.subject = id.to_string();
            e.reason = if reason.is_empty() {
                format!("sha256 {}", cert.sha256)
            } else {
                format!("{reason} (sha256 {})", cert.sha256)
            };
            Ok((node, vec![e]))
        })
    }

    /// How many nodes are registered.
    pub fn count(&self) -> usize {
        self.store.tree(T::Nodes).len()
    }
}
