//! What a generated object looks like: its graph's shape and its progress point.

/// Shape of the workflow graph; the "fan-out" (children/nodes/items) is what grows the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topology {
    /// A chain of `tasks` task nodes exactly as flyteadmin creates it: `status: {"phase":0}`,
    /// `generation: 1`, one `managedFields` entry (manager `flyteadmin`).
    Created {
        /// Number of task nodes in the chain.
        tasks: usize,
    },
    /// A chain of `tasks` task nodes whose first node failed after retries (user error / OOM /
    /// eviction): workflow phase 5, `termination-status`/`completed-time` labels, finalizer removed.
    Failed {
        /// Number of task nodes in the chain (only the first ran).
        tasks: usize,
    },
    /// `nodes` parallel task nodes (`n0..`) fed by `start-node`, fanned in to a collector node;
    /// every node is in `spec` (3 edge copies) and in `status.nodeStatus`.
    StaticFanout {
        /// Number of parallel task nodes (the collector is extra).
        nodes: usize,
    },
    /// Two prep tasks, then a `@dynamic` task `n2` whose `children` run as
    /// `status.nodeStatus.n2.subNodeStatus["dynamic-node"].subNodeStatus["dnK"]` (never in `spec`).
    Dynamic {
        /// Number of dynamic children (`dn0`..).
        children: usize,
    },
    /// A static sub-workflow (`workflow.subWorkflowRef`, inlined in `subWorkflows`) nested `depth`
    /// levels deep whose innermost node is a dynamic task with `children`; status nests via
    /// `subNodeStatus` at every level.
    NestedSubworkflow {
        /// Sub-workflow nesting levels (≥ 1).
        depth: usize,
        /// Dynamic children at the innermost level.
        children: usize,
    },
    /// An ArrayNode (map task) with `items` sub-nodes, whose state exists only as bit-packed
    /// `CompactArray`s (`{"BitSet":[u32..],"item":bits,"count":items}`) in `arrayNodeStatus`.
    ArrayNode {
        /// Number of mapped items.
        items: usize,
    },
}

/// A generation scenario: topology, parallelism, progress point and variants.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scenario {
    /// Graph shape and fan-out size.
    pub topology: Topology,
    /// `executionConfig.MaxParallelism`: how many fan-out children run at once (flyteadmin default
    /// 25; large fan-outs use 100–500+). Children beyond it stay pending (`{}`).
    pub max_parallelism: usize,
    /// Progress point: percent of fan-out children finished (0–100). 100 renders the completed
    /// workflow (dynamic subtrees collapsed, `termination-status` label). Ignored by `Created`/`Failed`.
    pub done_pct: u8,
    /// Per mille of fan-out children that fail permanently (kept in status with their `error`;
    /// spec gets `onFailurePolicy: FAIL_AFTER_EXECUTABLE_NODES_COMPLETE`).
    pub failed_permille: u16,
    /// flyteadmin `useOffloadedWorkflowClosure`: `workflowClosureReference` set, `spec` and `tasks`
    /// `null` and `subWorkflows` omitted (Go `omitempty`).
    pub offloaded_closure: bool,
    /// flyteadmin `useOffloadedInputs`: `offloadedInputs` URI instead of the `inputs` literal map.
    pub offloaded_inputs: bool,
    /// propeller `node-config.enable-cr-debug-metadata: true`: failed nodes keep their full status
    /// (TaskNodeStatus, timestamps, message) instead of collapsing.
    pub debug_metadata: bool,
}

impl Scenario {
    /// A scenario with no failures and no variants.
    pub fn new(topology: Topology, max_parallelism: usize, done_pct: u8) -> Self {
        Scenario { topology, max_parallelism, done_pct, failed_permille: 0, offloaded_closure: false, offloaded_inputs: false, debug_metadata: false }
    }
    /// The scenario behind the demo's and [`write_dir`](super::write_dir)'s update series: a dynamic fan-out of 2,000
    /// children at parallelism 100 (use with [`update_series`](super::update_series)).
    pub fn demo_series() -> Self {
        Scenario::new(Topology::Dynamic { children: 2000 }, 100, 0)
    }
    /// Sets [`Scenario::failed_permille`].
    pub fn failing(mut self, permille: u16) -> Self {
        self.failed_permille = permille;
        self
    }
    /// Enables [`Scenario::offloaded_closure`].
    pub fn closure_offloaded(mut self) -> Self {
        self.offloaded_closure = true;
        self
    }
    /// Enables [`Scenario::offloaded_inputs`].
    pub fn inputs_offloaded(mut self) -> Self {
        self.offloaded_inputs = true;
        self
    }
    /// Enables [`Scenario::debug_metadata`].
    pub fn debug(mut self) -> Self {
        self.debug_metadata = true;
        self
    }
    /// File-name-safe name, e.g. `dynamic-n2000-p100-running-30pct-closure-offloaded`.
    pub fn name(&self) -> String {
        let state = if self.done_pct >= 100 { "done".to_string() } else { format!("running-{}pct", self.done_pct) };
        let p = self.max_parallelism;
        let mut s = match self.topology {
            Topology::Created { tasks } => format!("created-chain-n{tasks}"),
            Topology::Failed { tasks } => format!("failed-chain-n{tasks}"),
            Topology::StaticFanout { nodes } => format!("static-n{nodes}-p{p}-{state}"),
            Topology::Dynamic { children } => format!("dynamic-n{children}-p{p}-{state}"),
            Topology::NestedSubworkflow { depth, children } => format!("nested-d{depth}-dyn{children}-p{p}-{state}"),
            Topology::ArrayNode { items } => format!("array-n{items}-p{p}-{state}"),
        };
        for (on, suffix) in [(self.failed_permille > 0, format!("-fail{}pm", self.failed_permille)), (self.offloaded_closure, "-closure-offloaded".into()), (self.offloaded_inputs, "-inputs-offloaded".into()), (self.debug_metadata, "-debug".into())] {
            if on {
                s.push_str(&suffix);
            }
        }
        s
    }
}
