//! The audit log as a Merkle tree, hashed as RFC 9162 §2.1 (and RFC 6962)
//! hash a log: `leaf = SHA-256(0x00 || data)`, `node = SHA-256(0x01 || l || r)`,
//! the tree of `n` leaves split at the largest power of two below `n`.
//!
//! Sans-IO: the tree is computed from leaf hashes fed in order, in
//! `O(log n)` memory ([`Frontier`]); a proof is the hashes of a handful of
//! disjoint leaf ranges ([`inclusion_ranges`], [`consistency_ranges`]), each
//! computed in the same single pass over the leaves ([`RangeHasher`]). The
//! verification functions are RFC 9162 §2.1.3.2 and §2.1.4.2.

use sha2::{Digest, Sha256};

/// Length of a tree hash (SHA-256).
pub const TREE_HASH_LEN: usize = 32;
/// A tree hash.
pub type TreeHash = [u8; TREE_HASH_LEN];
/// Most hashes a proof may hold: a tree of at most 2^64 leaves needs at most
/// 64 for inclusion and 2 × 64 for consistency.
pub const MAX_PROOF_LEN: usize = 130;

/// Why a proof could not be made or does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MerkleError {
    /// The leaf index is not inside the tree.
    #[error("leaf index {index} is outside a tree of {size} leaves")]
    IndexOutOfRange {
        /// The leaf index (from 0).
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// The old tree is larger than the new one.
    #[error("the old tree ({old} leaves) is larger than the new one ({new} leaves)")]
    OldLarger {
        /// Old size.
        old: u64,
        /// New size.
        new: u64,
    },
    /// The proof has the wrong number of hashes for the sizes.
    #[error("the proof has {found} hashes, which does not fit the tree sizes")]
    WrongLength {
        /// Hashes found.
        found: usize,
    },
    /// The proof leads to another root.
    #[error("the proof does not lead to the expected root")]
    RootMismatch,
}

/// The hash of a leaf: `SHA-256(0x00 || data)`.
pub fn leaf_hash(data: &[u8]) -> TreeHash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// The hash of an interior node: `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &TreeHash, right: &TreeHash) -> TreeHash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the empty tree: `SHA-256("")`.
pub fn empty_root() -> TreeHash {
    Sha256::digest([]).into()
}

/// The roots of the perfect subtrees that make up a tree of `size` leaves
/// (one per set bit of `size`, largest first): enough to append a leaf or
/// compute the root, in `O(log size)` memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    nodes: Vec<TreeHash>,
}

impl Frontier {
    /// The empty tree.
    pub fn new() -> Frontier {
        Frontier::default()
    }

    /// Leaves appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// A frontier from its parts (as [`Frontier::nodes`] gave them): one
    /// node per set bit of `size`, or `None`.
    pub fn from_parts(size: u64, nodes: Vec<TreeHash>) -> Option<Frontier> {
        let expected = usize::try_from(size.count_ones()).ok()?;
        (nodes.len() == expected).then_some(Frontier { size, nodes })
    }

    /// The perfect subtree roots, largest first.
    pub fn nodes(&self) -> &[TreeHash] {
        &self.nodes
    }

    /// Appends the leaf whose hash is `leaf`.
    pub fn push(&mut self, leaf: TreeHash) {
        let mut hash = leaf;
        let mut size = self.size;
        // Each trailing one bit of the size is a perfect subtree of the same
        // height as the one being carried: merge them.
        while size & 1 == 1 {
            match self.nodes.pop() {
                Some(left) => hash = node_hash(&left, &hash),
                None => break,
            }
            size >>= 1;
        }
        self.nodes.push(hash);
        self.size = self.size.saturating_add(1);
    }

    /// The tree's root hash (RFC 9162 `MTH`).
    pub fn root(&self) -> TreeHash {
        let mut nodes = self.nodes.iter().rev();
        let Some(last) = nodes.next() else {
            return empty_root();
        };
        nodes.fold(*last, |right, left| node_hash(left, &right))
    }
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    let below = n.saturating_sub(1);
    if below == 0 {
        return 0;
    }
    // `below` > 0, so it has at most 63 leading zeros.
    1u64 << 63u32.saturating_sub(below.leading_zeros())
}

/// The leaf ranges `[start, end)` whose subtree hashes are the inclusion
/// proof of leaf `index` in a tree of `size` leaves, in proof order (RFC
/// 9162 §2.1.3.1 `PATH`).
pub fn inclusion_ranges(index: u64, size: u64) -> Result<Vec<(u64, u64)>, MerkleError> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    let mut out = Vec::new();
    path(index, 0, size, &mut out);
    Ok(out)
}

fn path(m: u64, lo: u64, hi: u64, out: &mut Vec<(u64, u64)>) {
    let n = hi.saturating_sub(lo);
    if n <= 1 {
        return;
    }
    let k = split(n);
    let mid = lo.saturating_add(k);
    if m < k {
        path(m, lo, mid, out);
        out.push((mid, hi));
    } else {
        path(m.saturating_sub(k), mid, hi, out);
        out.push((lo, mid));
    }
}

/// The leaf ranges whose subtree hashes are the consistency proof from a
/// tree of `old` leaves to one of `new` leaves, in proof order (RFC 9162
/// §2.1.4.1 `PROOF`). Empty when `old` is 0 or equal to `new`.
pub fn consistency_ranges(old: u64, new: u64) -> Result<Vec<(u64, u64)>, MerkleError> {
    if old > new {
        return Err(MerkleError::OldLarger { old, new });
    }
    let mut out = Vec::new();
    if old > 0 && old < new {
        subproof(old, 0, new, true, &mut out);
    }
    Ok(out)
}

fn subproof(m: u64, lo: u64, hi: u64, complete: bool, out: &mut Vec<(u64, u64)>) {
    let n = hi.saturating_sub(lo);
    if m == n {
        if !complete {
            out.push((lo, hi));
        }
        return;
    }
    let k = split(n);
    let mid = lo.saturating_add(k);
    if m <= k {
        subproof(m, lo, mid, complete, out);
        out.push((mid, hi));
    } else {
        subproof(m.saturating_sub(k), mid, hi, false, out);
        out.push((lo, mid));
    }
}

/// Computes, in one pass over the leaves fed in order, the hashes of a set
/// of disjoint leaf ranges (a proof's), the root of the whole tree, and the
/// root of one prefix (the old tree of a consistency proof).
#[derive(Debug, Clone)]
pub struct RangeHasher {
    /// `(start, end, position in the proof)`, sorted by start.
    ranges: Vec<(u64, u64, usize)>,
    next: usize,
    current: Frontier,
    out: Vec<Option<TreeHash>>,
    all: Frontier,
    prefix: Option<u64>,
    prefix_root: Option<TreeHash>,
}

impl RangeHasher {
    /// A hasher for `ranges` (disjoint), and the root of the first `prefix`
    /// leaves if asked.
    pub fn new(ranges: &[(u64, u64)], prefix: Option<u64>) -> RangeHasher {
        let mut sorted: Vec<(u64, u64, usize)> = ranges
            .iter()
            .enumerate()
            .map(|(i, &(a, b))| (a, b, i))
            .collect();
        sorted.sort_unstable();
        RangeHasher {
            out: vec![None; sorted.len()],
            ranges: sorted,
            next: 0,
            current: Frontier::new(),
            all: Frontier::new(),
            prefix_root: (prefix == Some(0)).then(empty_root),
            prefix,
        }
    }

    /// Feeds the next leaf (index = leaves fed so far).
    pub fn push(&mut self, leaf: TreeHash) {
        let index = self.all.size();
        self.all.push(leaf);
        if Some(self.all.size()) == self.prefix {
            self.prefix_root = Some(self.all.root());
        }
        let Some(&(start, end, slot)) = self.ranges.get(self.next) else {
            return;
        };
        if index < start {
            return;
        }
        self.current.push(leaf);
        if index.saturating_add(1) == end {
            if let Some(out) = self.out.get_mut(slot) {
                *out = Some(self.current.root());
            }
            self.current = Frontier::new();
            self.next = self.next.saturating_add(1);
        }
    }

    /// Leaves fed so far.
    pub fn size(&self) -> u64 {
        self.all.size()
    }

    /// The root of every leaf fed.
    pub fn root(&self) -> TreeHash {
        self.all.root()
    }

    /// The root of the prefix asked for, once that many leaves were fed.
    pub fn prefix_root(&self) -> Option<TreeHash> {
        self.prefix_root
    }

    /// The range hashes in proof order, once every range was fed.
    pub fn proof(&self) -> Option<Vec<TreeHash>> {
        self.out.iter().copied().collect()
    }
}

/// Checks that `leaf` is leaf `index` of the tree of `size` leaves whose
/// root is `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &TreeHash,
    proof: &[TreeHash],
    root: &TreeHash,
) -> Result<(), MerkleError> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    if proof.len() > MAX_PROOF_LEN {
        return Err(MerkleError::WrongLength { found: proof.len() });
    }
    let mut f = index;
    let mut s = size.saturating_sub(1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return Err(MerkleError::WrongLength { found: proof.len() });
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(MerkleError::WrongLength { found: proof.len() });
    }
    if r != *root {
        return Err(MerkleError::RootMismatch);
    }
    Ok(())
}

/// Checks that the tree of `old` leaves with root `old_root` is a prefix of
/// the tree of `new` leaves with root `new_root` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old: u64,
    new: u64,
    old_root: &TreeHash,
    new_root: &TreeHash,
    proof: &[TreeHash],
) -> Result<(), MerkleError> {
    if old > new {
        return Err(MerkleError::OldLarger { old, new });
    }
    if proof.len() > MAX_PROOF_LEN {
        return Err(MerkleError::WrongLength { found: proof.len() });
    }
    if old == new {
        if !proof.is_empty() {
            return Err(MerkleError::WrongLength { found: proof.len() });
        }
        if old_root != new_root {
            return Err(MerkleError::RootMismatch);
        }
        return Ok(());
    }
    if old == 0 {
        // The empty tree is a prefix of every tree, and has one root.
        if !proof.is_empty() {
            return Err(MerkleError::WrongLength { found: proof.len() });
        }
        if *old_root != empty_root() {
            return Err(MerkleError::RootMismatch);
        }
        return Ok(());
    }
    let mut path: Vec<TreeHash> = Vec::with_capacity(proof.len().saturating_add(1));
    if old.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let Some((first, rest)) = path.split_first() else {
        return Err(MerkleError::WrongLength { found: proof.len() });
    };
    let mut f = old.saturating_sub(1);
    let mut s = new.saturating_sub(1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let mut fr = *first;
    let mut sr = *first;
    for c in rest {
        if s == 0 {
            return Err(MerkleError::WrongLength { found: proof.len() });
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(MerkleError::WrongLength { found: proof.len() });
    }
    if fr != *old_root || sr != *new_root {
        return Err(MerkleError::RootMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::cast_possible_truncation
    )]
    //! Vectors: the RFC 6962 test tree of transparency-dev/merkle
    //! (`testonly/constants.go`, `proof/verify_test.go`): eight leaf inputs,
    //! the roots of every prefix, and published inclusion and consistency
    //! proofs.

    use super::*;

    fn h(s: &str) -> TreeHash {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    const LEAVES: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];

    /// Roots of the trees of 0..=8 leaves.
    const ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    /// (leaf index from 0, tree size, proof)
    fn inclusion_vectors() -> Vec<(u64, u64, Vec<TreeHash>)> {
        vec![
            (0, 1, vec![]),
            (
                0,
                8,
                vec![
                    h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
                    h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                    h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
                ],
            ),
            (
                5,
                8,
                vec![
                    h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
                    h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
                    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
                ],
            ),
            (
                2,
                3,
                vec![h(
                    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
                )],
            ),
            (
                1,
                5,
                vec![
                    h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
                    h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                    h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
                ],
            ),
        ]
    }

    /// (old size, new size, proof)
    fn consistency_vectors() -> Vec<(u64, u64, Vec<TreeHash>)> {
        vec![
            (1, 1, vec![]),
            (
                1,
                8,
                vec![
                    h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
                    h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                    h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
                ],
            ),
            (
                6,
                8,
                vec![
                    h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
                    h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
                    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
                ],
            ),
            (
                2,
                5,
                vec![
                    h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                    h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
                ],
            ),
            (
                6,
                7,
                vec![
                    h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
                    h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
                    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
                ],
            ),
        ]
    }

    fn leaf_hashes() -> Vec<TreeHash> {
        LEAVES
            .iter()
            .map(|l| leaf_hash(&hex::decode(l).unwrap()))
            .collect()
    }

    fn make_proof(ranges: &[(u64, u64)], size: u64) -> Vec<TreeHash> {
        let mut hasher = RangeHasher::new(ranges, None);
        for leaf in leaf_hashes().into_iter().take(size as usize) {
            hasher.push(leaf);
        }
        hasher.proof().unwrap()
    }

    #[test]
    fn roots_of_every_prefix_match_the_vectors() {
        let mut frontier = Frontier::new();
        assert_eq!(frontier.root(), h(ROOTS[0]));
        for (i, leaf) in leaf_hashes().into_iter().enumerate() {
            frontier.push(leaf);
            assert_eq!(frontier.root(), h(ROOTS[i + 1]), "size {}", i + 1);
        }
    }

    #[test]
    fn inclusion_proofs_match_and_verify_against_the_vectors() {
        let leaves = leaf_hashes();
        for (index, size, proof) in inclusion_vectors() {
            let made = make_proof(&inclusion_ranges(index, size).unwrap(), size);
            assert_eq!(made, proof, "inclusion {index} in {size}");
            let root = h(ROOTS[size as usize]);
            let leaf = leaves[index as usize];
            verify_inclusion(index, size, &leaf, &proof, &root).unwrap();
            // Corruptions are refused.
            assert!(verify_inclusion(index + 1, size, &leaf, &proof, &root).is_err());
            assert!(verify_inclusion(index, size * 2, &leaf, &proof, &root).is_err());
            assert!(verify_inclusion(index, size, &h(ROOTS[0]), &proof, &root).is_err());
            let mut longer = proof.clone();
            longer.push(root);
            assert!(verify_inclusion(index, size, &leaf, &longer, &root).is_err());
            for i in 0..proof.len() {
                let mut bad = proof.clone();
                bad[i][0] ^= 8;
                assert!(verify_inclusion(index, size, &leaf, &bad, &root).is_err());
            }
            if !proof.is_empty() {
                let shorter = &proof[..proof.len() - 1];
                assert!(verify_inclusion(index, size, &leaf, shorter, &root).is_err());
            }
        }
    }

    #[test]
    fn consistency_proofs_match_and_verify_against_the_vectors() {
        // The empty tree is a prefix of every tree, under its one root only.
        let r3 = h(ROOTS[3]);
        verify_consistency(0, 3, &empty_root(), &r3, &[]).unwrap();
        assert!(verify_consistency(0, 3, &r3, &r3, &[]).is_err());
        for (old, new, proof) in consistency_vectors() {
            let made = make_proof(&consistency_ranges(old, new).unwrap(), new);
            assert_eq!(made, proof, "consistency {old} -> {new}");
            let (r1, r2) = (h(ROOTS[old as usize]), h(ROOTS[new as usize]));
            verify_consistency(old, new, &r1, &r2, &proof).unwrap();
            if proof.is_empty() {
                continue;
            }
            assert!(verify_consistency(old, new, &r2, &r1, &proof).is_err());
            assert!(verify_consistency(old - 1, new, &r1, &r2, &proof).is_err());
            assert!(verify_consistency(old + 1, new, &r1, &r2, &proof).is_err());
            assert!(verify_consistency(old, new * 2, &r1, &r2, &proof).is_err());
            assert!(verify_consistency(old, new, &r1, &r2, &[]).is_err());
            assert!(verify_consistency(old, new, &r1, &r2, &proof[..proof.len() - 1]).is_err());
            for i in 0..proof.len() {
                let mut bad = proof.clone();
                bad[i][0] ^= 16;
                assert!(verify_consistency(old, new, &r1, &r2, &bad).is_err());
            }
        }
        // A larger old tree is refused, as is a changed prefix.
        assert!(verify_consistency(3, 2, &h(ROOTS[3]), &h(ROOTS[2]), &[]).is_err());
        assert!(verify_consistency(1, 1, &h(ROOTS[1]), &h(ROOTS[2]), &[]).is_err());
    }

    #[test]
    fn every_proof_of_a_larger_tree_verifies() {
        // Beyond the vectors: all indices and sizes up to 70 leaves, against
        // roots computed by the frontier.
        let leaves: Vec<TreeHash> = (0u32..70).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut roots = vec![empty_root()];
        let mut frontier = Frontier::new();
        for leaf in &leaves {
            frontier.push(*leaf);
            roots.push(frontier.root());
        }
        for size in 1..=70u64 {
            for index in 0..size {
                let ranges = inclusion_ranges(index, size).unwrap();
                let mut hasher = RangeHasher::new(&ranges, None);
                for leaf in &leaves[..size as usize] {
                    hasher.push(*leaf);
                }
                let proof = hasher.proof().unwrap();
                verify_inclusion(
                    index,
                    size,
                    &leaves[index as usize],
                    &proof,
                    &roots[size as usize],
                )
                .unwrap();
            }
            for old in 0..=size {
                let ranges = consistency_ranges(old, size).unwrap();
                let mut hasher = RangeHasher::new(&ranges, Some(old));
                for leaf in &leaves[..size as usize] {
                    hasher.push(*leaf);
                }
                assert_eq!(hasher.prefix_root(), Some(roots[old as usize]));
                let proof = hasher.proof().unwrap();
                verify_consistency(
                    old,
                    size,
                    &roots[old as usize],
                    &roots[size as usize],
                    &proof,
                )
                .unwrap();
                if old > 0 && old < size {
                    let other = roots[old as usize - 1];
                    assert!(
                        verify_consistency(old, size, &other, &roots[size as usize], &proof)
                            .is_err()
                    );
                }
            }
        }
    }
}
