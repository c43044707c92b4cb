//! An approximate picture of which worker has which prompt prefix in its KV cache: a radix
//! tree over prompt bytes whose nodes record which workers ("tenants") were sent a prompt
//! through them, and when. It is approximate because the router never sees the engines'
//! evictions; it bounds each tenant's share instead and forgets the least recently used.
//!
//! Invariant: a tenant present at a node is present at every ancestor, so a tenant's
//! leaves are where its oldest entries can be cut without breaking any path.

use std::collections::HashMap;

use crate::workers::WorkerId;

const ROOT: usize = 0;

#[derive(Debug, Default)]
struct Node {
    edge: Vec<u8>,
    parent: usize,
    children: HashMap<u8, usize>,
    /// Tenant -> tick of its last insert through this node.
    tenants: HashMap<WorkerId, u64>,
    /// A whole inserted prompt ended here.
    prompt_end: bool,
}

#[derive(Debug, Default, PartialEq)]
pub struct PrefixMatch {
    /// Bytes of the text found in the tree.
    pub matched: usize,
    /// Tenants that hold the whole matched prefix.
    pub tenants: Vec<WorkerId>,
    /// The matched prefix is a whole earlier prompt: the text continues it (the next turn
    /// of a conversation), however short the earlier prompt is next to the new one.
    pub continues_a_prompt: bool,
}

#[derive(Debug)]
pub struct PrefixTree {
    nodes: Vec<Node>,
    free: Vec<usize>,
    bytes_per_tenant: HashMap<WorkerId, usize>,
    tick: u64,
}

impl Default for PrefixTree {
    fn default() -> Self {
        PrefixTree { nodes: vec![Node::default()], free: Vec::new(), bytes_per_tenant: HashMap::new(), tick: 0 }
    }
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixTree {
    pub fn bytes_of(&self, tenant: WorkerId) -> usize {
        self.bytes_per_tenant.get(&tenant).copied().unwrap_or(0)
    }

    pub fn longest_match(&self, text: &[u8]) -> PrefixMatch {
        let (mut node, mut pos, mut deepest) = (ROOT, 0, None);
        while pos < text.len() {
            let Some(&child) = self.nodes[node].children.get(&text[pos]) else { break };
            let edge = &self.nodes[child].edge;
            let common = common_prefix(edge, &text[pos..]);
            pos += common;
            deepest = Some(child);
            if common < edge.len() {
                break;
            }
            node = child;
        }
        let tenants = deepest.map(|n| self.nodes[n].tenants.keys().copied().collect()).unwrap_or_default();
        // `node` is the deepest node matched to the end of its edge.
        let continues_a_prompt = node != ROOT && self.nodes[node].prompt_end;
        PrefixMatch { matched: pos, tenants, continues_a_prompt }
    }

    pub fn insert(&mut self, text: &[u8], tenant: WorkerId) {
        self.tick += 1;
        let (mut node, mut pos) = (ROOT, 0);
        while pos < text.len() {
            let next = match self.nodes[node].children.get(&text[pos]).copied() {
                None => self.add_leaf(node, &text[pos..]),
                Some(child) => {
                    let common = common_prefix(&self.nodes[child].edge, &text[pos..]);
                    if common < self.nodes[child].edge.len() {
                        self.split(child, common)
                    } else {
                        child
                    }
                }
            };
            self.touch(next, tenant);
            pos += self.nodes[next].edge.len();
            node = next;
        }
        if node != ROOT {
            self.nodes[node].prompt_end = true;
        }
    }

    /// Forgets `tenant`'s least recently used prefixes until it holds at most `max_bytes`.
    pub fn evict(&mut self, tenant: WorkerId, max_bytes: usize) {
        while self.bytes_of(tenant) > max_bytes {
            let mut leaves = self.tenant_leaves(tenant);
            if leaves.is_empty() {
                return;
            }
            leaves.sort_by_key(|&(_, tick)| tick);
            for (leaf, _) in leaves {
                if self.bytes_of(tenant) <= max_bytes {
                    return;
                }
                self.drop_tenant_at(leaf, tenant);
            }
        }
    }

    pub fn remove_tenant(&mut self, tenant: WorkerId) {
        self.evict(tenant, 0);
        self.bytes_per_tenant.remove(&tenant);
    }

    /// Nodes holding `tenant` where no child does, with the tenant's tick there.
    fn tenant_leaves(&self, tenant: WorkerId) -> Vec<(usize, u64)> {
        let mut leaves = Vec::new();
        let mut stack = vec![ROOT];
        while let Some(node) = stack.pop() {
            let mut child_holds = false;
            for &child in self.nodes[node].children.values() {
                if self.nodes[child].tenants.contains_key(&tenant) {
                    child_holds = true;
                    stack.push(child);
                }
            }
            if node != ROOT && !child_holds {
                if let Some(&tick) = self.nodes[node].tenants.get(&tenant) {
                    leaves.push((node, tick));
                }
            }
        }
        leaves
    }

    fn touch(&mut self, node: usize, tenant: WorkerId) {
        let tick = self.tick;
        if self.nodes[node].tenants.insert(tenant, tick).is_none() {
            *self.bytes_per_tenant.entry(tenant).or_default() += self.nodes[node].edge.len();
        }
    }

    fn drop_tenant_at(&mut self, node: usize, tenant: WorkerId) {
        if self.nodes[node].tenants.remove(&tenant).is_some() {
            let bytes = self.bytes_per_tenant.entry(tenant).or_default();
            *bytes = bytes.saturating_sub(self.nodes[node].edge.len());
        }
        self.prune(node);
    }

    /// Removes nodes nobody holds, from `node` up.
    fn prune(&mut self, mut node: usize) {
        while node != ROOT && self.nodes[node].tenants.is_empty() && self.nodes[node].children.is_empty() {
            let parent = self.nodes[node].parent;
            let first = self.nodes[node].edge[0];
            self.nodes[parent].children.remove(&first);
            self.nodes[node] = Node::default();
            self.free.push(node);
            node = parent;
        }
    }

    fn alloc(&mut self, node: Node) -> usize {
        match self.free.pop() {
            Some(slot) => {
                self.nodes[slot] = node;
                slot
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        }
    }

    fn add_leaf(&mut self, parent: usize, edge: &[u8]) -> usize {
        let leaf = self.alloc(Node { edge: edge.to_vec(), parent, ..Node::default() });
        self.nodes[parent].children.insert(edge[0], leaf);
        leaf
    }

    /// Cuts `child`'s edge after `at` bytes; the new upper node takes the child's tenants
    /// (whoever holds the whole edge holds its first part) and is returned.
    fn split(&mut self, child: usize, at: usize) -> usize {
        let parent = self.nodes[child].parent;
        let lower_edge = self.nodes[child].edge.split_off(at);
        let upper_edge = std::mem::take(&mut self.nodes[child].edge);
        let tenants = self.nodes[child].tenants.clone();
        let upper = self.alloc(Node { edge: upper_edge, parent, children: HashMap::new(), tenants, prompt_end: false });
        self.nodes[upper].children.insert(lower_edge[0], child);
        self.nodes[child].edge = lower_edge;
        self.nodes[child].parent = upper;
        let first = self.nodes[upper].edge[0];
        self.nodes[parent].children.insert(first, upper);
        upper
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: WorkerId = WorkerId(1);
    const B: WorkerId = WorkerId(2);

    #[test]
    fn finds_the_longest_shared_prefix_and_who_holds_it() {
        let mut tree = PrefixTree::default();
        tree.insert(b"system: be brief\nuser: hello", A);
        tree.insert(b"system: be brief\nuser: bye", B);
        let m = tree.longest_match(b"system: be brief\nuser: hello again");
        assert_eq!(m.matched, "system: be brief\nuser: hello".len());
        assert_eq!(m.tenants, vec![A]);
        let mut shared = tree.longest_match(b"system: be brief\nuser: ?").tenants;
        shared.sort();
        assert_eq!(shared, vec![A, B]);
        assert_eq!(tree.longest_match(b"other").matched, 0);
    }

    #[test]
    fn knows_when_a_text_continues_a_whole_earlier_prompt() {
        let mut tree = PrefixTree::default();
        tree.insert(b"user: hi\n", A);
        assert!(tree.longest_match(b"user: hi\nassistant: a very long answer").continues_a_prompt);
        assert!(!tree.longest_match(b"user: h").continues_a_prompt);
        assert!(!tree.longest_match(b"user: hello").continues_a_prompt);
        tree.insert(b"user: hi\nassistant: more", A);
        assert!(tree.longest_match(b"user: hi\nassistant: more and more").continues_a_prompt);
    }

    #[test]
    fn counts_bytes_per_tenant_without_double_counting_splits() {
        let mut tree = PrefixTree::default();
        tree.insert(b"abcdef", A);
        tree.insert(b"abcxyz", A);
        assert_eq!(tree.bytes_of(A), 9); // "abc" + "def" + "xyz"
        tree.insert(b"abcdef", B);
        assert_eq!(tree.bytes_of(B), 6);
    }

    #[test]
    fn eviction_drops_the_least_recently_used_first() {
        let mut tree = PrefixTree::default();
        tree.insert(b"old-prefix-1111", A);
        tree.insert(b"new-prefix-2222", A);
        tree.evict(A, 20);
        assert_eq!(tree.longest_match(b"old-prefix-1111").matched, 0);
        assert_eq!(tree.longest_match(b"new-prefix-2222").matched, 15);
        assert!(tree.bytes_of(A) <= 20);
    }

    #[test]
    fn removing_a_tenant_keeps_the_others() {
        let mut tree = PrefixTree::default();
        tree.insert(b"shared-then-a", A);
        tree.insert(b"shared-then-b", B);
        tree.remove_tenant(A);
        assert_eq!(tree.bytes_of(A), 0);
        let m = tree.longest_match(b"shared-then-a");
        assert_eq!(m.tenants, vec![B]);
        assert_eq!(m.matched, "shared-then-".len());
        tree.remove_tenant(B);
        assert_eq!(tree.longest_match(b"shared").matched, 0);
        assert_eq!(tree.nodes[ROOT].children.len(), 0, "empty nodes are pruned");
    }
}
