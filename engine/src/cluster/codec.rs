//! The plan codecs of a Balans cluster: our logical nodes, operators and profile tables as
//! bytes, everything else delegated to Ballista's own codecs (a session has one codec of each
//! kind, so ours wraps Ballista's instead of stacking on it).
//!
//! | travels as | logical (client → scheduler) | physical (scheduler → executors) |
//! |---|---|---|
//! | a correction | `BalansNode` (one per pass) | `BalansTaskExec` / `BalansMergeExec` / `BalansGatherExec` (stages), or `BalansPassExec` (the passes as one task) |
//! | `evaluate(...)` | `EvaluateNode` | `EvaluateExec` |
//! | a model embedding | `EmbedNode` | `EmbedExec` (the model directory is read where it runs) |
//! | a profile table | `FileListTable` (file list, schema, format) | Ballista's `DataSourceExec` |
//!
//! Our UDFs travel by name and are found in the scheduler's and executors' function
//! registries (`balans_udfs::register_all`). A `preprocess(...)` relation cannot travel: it
//! runs while planning, and its result is working files on the planning machine.
//!
//! Payloads are a tag line followed by JSON, so a Balans payload is never mistaken for one of
//! Ballista's protobuf messages.

use std::path::PathBuf;
use std::sync::Arc;

use balans_operators::exec::cluster::{
    BalansGatherExec, BalansMergeExec, BalansTaskExec, MergeStep, TaskStep,
};
use balans_operators::exec::concat::OrderedConcatExec;
use balans_operators::exec::embed::{EmbedExec, load_model};
use balans_operators::exec::evaluate::{EvaluateExec, EvaluateSpec};
use balans_operators::exec::pass::BalansPassExec;
use balans_operators::exec::preprocess::PreprocessExec;
use balans_operators::{BalansConfig, BalansSpec, ProgressSink};
use balans_planner::BalansNode;
use balans_planner::embed::EmbedNode;
use balans_planner::evaluate::EvaluateNode;
use balans_planner::preprocess::PreprocessNode;
use ballista_core::serde::{BallistaLogicalExtensionCodec, BallistaPhysicalExtensionCodec};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::common::TableReference;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Extension, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use serde::{Deserialize, Serialize};

use crate::source::{decode_profile_table, encode_profile_table};

/// Tag line of a Balans node payload.
const NODE_TAG: &[u8] = b"balans-node/1\n";

/// One pass of a correction, without its progress receiver (each process has its own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PassPayload {
    features: Vec<String>,
    batch: Vec<String>,
    config: BalansConfig,
    pass: usize,
    fit_mask: Option<String>,
    anchor_label: Option<String>,
}

impl PassPayload {
    fn of(spec: &BalansSpec) -> Self {
        Self {
            features: spec.features.clone(),
            batch: spec.batch.clone(),
            config: spec.config.clone(),
            pass: spec.pass,
            fit_mask: spec.fit_mask.clone(),
            anchor_label: spec.anchor_label.clone(),
        }
    }

    fn into_spec(self, progress: Arc<dyn ProgressSink>) -> BalansSpec {
        let mut spec = BalansSpec::new(self.features, self.batch, self.config, progress);
        spec.pass = self.pass;
        spec.fit_mask = self.fit_mask;
        spec.anchor_label = self.anchor_label;
        spec
    }
}

/// What a Balans node or operator carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum NodePayload {
    /// `BalansNode`: one pass.
    Correction(Box<PassPayload>),
    /// `BalansPassExec`: consecutive passes.
    Passes(Vec<PassPayload>),
    /// `EvaluateNode` / `EvaluateExec`.
    Evaluate(EvaluateSpec),
    /// `EmbedNode` / `EmbedExec`.
    Embed(PathBuf),
    /// `OrderedConcatExec`.
    OrderedConcat,
    /// `BalansTaskExec`: a per-partition step of a pass planned as stages.
    Task {
        /// The passes (the step belongs to the last).
        passes: Vec<PassPayload>,
        /// The step.
        step: TaskStep,
        /// The pass's partitions.
        partitions: usize,
        /// Whether it has a next input.
        has_next: bool,
    },
    /// `BalansMergeExec`: a global step of a pass planned as stages.
    Merge {
        /// The pass.
        pass: Box<PassPayload>,
        /// The step.
        step: MergeStep,
    },
    /// `BalansGatherExec`.
    Gather,
}

fn encode_payload(payload: &NodePayload, buf: &mut Vec<u8>) -> Result<()> {
    buf.extend_from_slice(NODE_TAG);
    serde_json::to_writer(buf, payload)
        .map_err(|e| DataFusionError::Internal(format!("cannot encode a Balans node: {e}")))
}

/// `None` when `buf` is not a Balans payload (then it is one of Ballista's).
fn decode_payload(buf: &[u8]) -> Option<Result<NodePayload>> {
    let body = buf.strip_prefix(NODE_TAG)?;
    Some(
        serde_json::from_slice(body)
            .map_err(|e| DataFusionError::Internal(format!("cannot decode a Balans node: {e}"))),
    )
}

fn one_input<T: Clone>(inputs: &[T], what: &str) -> Result<T> {
    match inputs {
        [input] => Ok(input.clone()),
        _ => Err(DataFusionError::Internal(format!(
            "{what} takes one input, the plan has {}",
            inputs.len()
        ))),
    }
}

fn preprocess_error() -> DataFusionError {
    DataFusionError::Plan(
        "preprocess(...) runs while the statement is planned and keeps its result on the \
         planning machine, so it cannot run on a cluster: write it to a file with `balans \
         preprocess --scheduler ...` (its aggregation runs on the cluster) and query that file"
            .into(),
    )
}

/// The logical codec of the client and the scheduler.
#[derive(Debug)]
pub struct BalansLogicalCodec {
    inner: BallistaLogicalExtensionCodec,
    progress: Arc<dyn ProgressSink>,
}

impl BalansLogicalCodec {
    /// A codec whose decoded corrections report to `progress`.
    pub fn new(progress: Arc<dyn ProgressSink>) -> Self {
        Self {
            inner: BallistaLogicalExtensionCodec::default(),
            progress,
        }
    }
}

impl LogicalExtensionCodec for BalansLogicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[LogicalPlan],
        ctx: &TaskContext,
    ) -> Result<Extension> {
        let Some(payload) = decode_payload(buf) else {
            return self.inner.try_decode(buf, inputs, ctx);
        };
        let node: Arc<dyn datafusion::logical_expr::UserDefinedLogicalNode> = match payload? {
            NodePayload::Correction(pass) => Arc::new(BalansNode::try_new(
                one_input(inputs, "Balans")?,
                pass.into_spec(self.progress.clone()),
            )?),
            NodePayload::Evaluate(spec) => {
                Arc::new(EvaluateNode::try_new(one_input(inputs, "Evaluate")?, spec)?)
            }
            NodePayload::Embed(dir) => {
                Arc::new(EmbedNode::try_new(one_input(inputs, "Embed")?, &dir)?)
            }
            other => {
                return Err(DataFusionError::Internal(format!(
                    "{other:?} is a physical operator, not a logical node"
                )));
            }
        };
        Ok(Extension { node })
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> Result<()> {
        let any = node.node.as_any();
        if let Some(balans) = any.downcast_ref::<BalansNode>() {
            encode_payload(
                &NodePayload::Correction(Box::new(PassPayload::of(balans.spec()))),
                buf,
            )
        } else if let Some(evaluate) = any.downcast_ref::<EvaluateNode>() {
            encode_payload(&NodePayload::Evaluate(evaluate.spec().clone()), buf)
        } else if let Some(embed) = any.downcast_ref::<EmbedNode>() {
            encode_payload(&NodePayload::Embed(embed.model_dir().to_path_buf()), buf)
        } else if any.is::<PreprocessNode>() {
            Err(preprocess_error())
        } else {
            self.inner.try_encode(node, buf)
        }
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: SchemaRef,
        ctx: &TaskContext,
    ) -> Result<Arc<dyn TableProvider>> {
        match decode_profile_table(buf) {
            Some(table) => {
                table.map_err(|e| DataFusionError::Plan(format!("table {table_ref}: {e}")))
            }
            None => self
                .inner
                .try_decode_table_provider(buf, table_ref, schema, ctx),
        }
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn TableProvider>,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        match encode_profile_table(node.as_ref()) {
            Some(bytes) => {
                let bytes =
                    bytes.map_err(|e| DataFusionError::Plan(format!("table {table_ref}: {e}")))?;
                buf.extend_from_slice(&bytes);
                Ok(())
            }
            None => self.inner.try_encode_table_provider(table_ref, node, buf),
        }
    }

    fn try_decode_file_format(
        &self,
        buf: &[u8],
        ctx: &TaskContext,
    ) -> Result<Arc<dyn datafusion::datasource::file_format::FileFormatFactory>> {
        self.inner.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(
        &self,
        buf: &mut Vec<u8>,
        node: Arc<dyn datafusion::datasource::file_format::FileFormatFactory>,
    ) -> Result<()> {
        self.inner.try_encode_file_format(buf, node)
    }
}

/// The physical codec of the scheduler and the executors.
#[derive(Debug)]
pub struct BalansPhysicalCodec {
    inner: BallistaPhysicalExtensionCodec,
    progress: Arc<dyn ProgressSink>,
}

impl BalansPhysicalCodec {
    /// A codec whose decoded corrections report to `progress`.
    pub fn new(progress: Arc<dyn ProgressSink>) -> Self {
        Self {
            inner: BallistaPhysicalExtensionCodec::default(),
            progress,
        }
    }
}

impl PhysicalExtensionCodec for BalansPhysicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let Some(payload) = decode_payload(buf) else {
            return self.inner.try_decode(buf, inputs, ctx, proto_converter);
        };
        Ok(match payload? {
            NodePayload::Passes(passes) => {
                let specs = passes
                    .into_iter()
                    .map(|p| p.into_spec(self.progress.clone()))
                    .collect();
                Arc::new(BalansPassExec::try_new(
                    one_input(inputs, "BalansPassExec")?,
                    specs,
                )?)
            }
            NodePayload::Evaluate(spec) => {
                Arc::new(EvaluateExec::new(one_input(inputs, "EvaluateExec")?, spec))
            }
            NodePayload::Embed(dir) => {
                let model = load_model(&dir)?;
                Arc::new(EmbedExec::try_new(
                    one_input(inputs, "EmbedExec")?,
                    dir,
                    model,
                )?)
            }
            NodePayload::OrderedConcat => Arc::new(OrderedConcatExec::new(one_input(
                inputs,
                "OrderedConcatExec",
            )?)),
            NodePayload::Task {
                passes,
                step,
                partitions,
                has_next,
            } => Arc::new(BalansTaskExec::from_children(
                step,
                passes
                    .into_iter()
                    .map(|p| p.into_spec(self.progress.clone()))
                    .collect(),
                partitions,
                has_next,
                inputs.to_vec(),
            )?),
            NodePayload::Merge { pass, step } => Arc::new(BalansMergeExec::new(
                step,
                pass.into_spec(self.progress.clone()),
                one_input(inputs, "BalansMergeExec")?,
            )),
            NodePayload::Gather => Arc::new(BalansGatherExec::new(one_input(
                inputs,
                "BalansGatherExec",
            )?)),
            NodePayload::Correction(_) => {
                return Err(DataFusionError::Internal(
                    "a logical correction node reached the physical codec".into(),
                ));
            }
        })
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        if let Some(pass) = node.downcast_ref::<BalansPassExec>() {
            let passes = pass.specs().iter().map(PassPayload::of).collect();
            encode_payload(&NodePayload::Passes(passes), buf)
        } else if let Some(evaluate) = node.downcast_ref::<EvaluateExec>() {
            encode_payload(&NodePayload::Evaluate(evaluate.spec().clone()), buf)
        } else if let Some(embed) = node.downcast_ref::<EmbedExec>() {
            encode_payload(&NodePayload::Embed(embed.model_dir().to_path_buf()), buf)
        } else if node.is::<OrderedConcatExec>() {
            encode_payload(&NodePayload::OrderedConcat, buf)
        } else if let Some(task) = node.downcast_ref::<BalansTaskExec>() {
            let payload = NodePayload::Task {
                passes: task.specs().iter().map(PassPayload::of).collect(),
                step: task.step(),
                partitions: task.partitions(),
                has_next: task.has_next(),
            };
            encode_payload(&payload, buf)
        } else if let Some(merge) = node.downcast_ref::<BalansMergeExec>() {
            let payload = NodePayload::Merge {
                pass: Box::new(PassPayload::of(merge.spec())),
                step: merge.step(),
            };
            encode_payload(&payload, buf)
        } else if node.is::<BalansGatherExec>() {
            encode_payload(&NodePayload::Gather, buf)
        } else if node.is::<PreprocessExec>() {
            Err(preprocess_error())
        } else if node.name().starts_with("Balans") {
            Err(DataFusionError::Plan(format!(
                "{} is a step of a correction planned for one machine; a cluster's scheduler \
                 plans a correction as stages or BalansPassExec (its sessions carry \
                 ClusterPlanning)",
                node.name()
            )))
        } else {
            self.inner.try_encode(node, buf, proto_converter)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::scheduler_session;
    use crate::correct::{CorrectRequest, correct_plan};
    use crate::session::{SessionSettings, build_session};
    use crate::source::{FeatureSelection, SourceOptions, register_profiles};
    use balans_operators::{Method, NoProgress};
    use datafusion::common::tree_node::TreeNode;
    use datafusion::physical_plan::{ExecutionPlanProperties, displayable};
    use datafusion_proto::bytes::{
        logical_plan_from_bytes_with_extension_codec, logical_plan_to_bytes_with_extension_codec,
        physical_plan_from_bytes_with_extension_codec, physical_plan_to_bytes_with_extension_codec,
    };

    fn example() -> String {
        format!(
            "{}/../examples/data/bbbc021.parquet",
            env!("CARGO_MANIFEST_DIR")
        )
    }

    /// Every plan `balans correct` makes (each method, anchors) survives both codecs; the
    /// scheduler plans BALANS, ComBat and sphering as stages of tasks, Harmony as one
    /// `BalansPassExec` over a coalesced scan.
    #[tokio::test]
    async fn the_plans_of_balans_correct_round_trip() {
        let ctx = build_session(&SessionSettings::default()).unwrap();
        let source = SourceOptions {
            scan_partitions: 3,
            ..SourceOptions::default()
        };
        let table = register_profiles(&ctx, &example(), "profiles", &source)
            .await
            .unwrap();
        let logical = BalansLogicalCodec::new(Arc::new(NoProgress));
        let physical = BalansPhysicalCodec::new(Arc::new(NoProgress));
        let scheduler = scheduler_session().unwrap();
        let task = scheduler.task_ctx();
        let cases: Vec<(Method, Option<&str>, balans_operators::Anchor)> = vec![
            (Method::Balans, None, balans_operators::Anchor::None),
            (
                Method::Balans,
                Some("Metadata_PertType = 'negcon'"),
                balans_operators::Anchor::Negcon,
            ),
            (Method::ComBat, None, balans_operators::Anchor::None),
            (
                Method::Sphering,
                Some("Metadata_PertType = 'negcon'"),
                balans_operators::Anchor::None,
            ),
            (Method::Harmony, None, balans_operators::Anchor::None),
        ];
        for (method, negcon, anchor) in cases {
            let request = CorrectRequest {
                input: example(),
                output: "unused.parquet".into(),
                batch: vec!["Metadata_Batch".into()],
                selection: FeatureSelection::default(),
                config: BalansConfig {
                    method,
                    anchor,
                    seed: 9,
                    ..BalansConfig::default()
                },
                overwrite: false,
                source: source.clone(),
                negcon: negcon.map(String::from),
                anchor_label: None,
                model: None,
            };
            let (plan, _) = correct_plan(&ctx, &table, &request, Arc::new(NoProgress))
                .await
                .unwrap();
            let plan = ctx.state().optimize(&plan).unwrap();
            let bytes = logical_plan_to_bytes_with_extension_codec(&plan, &logical).unwrap();
            let decoded =
                logical_plan_from_bytes_with_extension_codec(&bytes, &task, &logical).unwrap();
            assert_eq!(
                decoded.display_indent().to_string(),
                plan.display_indent().to_string(),
                "{method}"
            );
            let planned = scheduler
                .state()
                .create_physical_plan(&decoded)
                .await
                .unwrap();
            let shown = displayable(planned.as_ref()).indent(true).to_string();
            if method == Method::Harmony {
                // Harmony's global step needs every row: the pass is one task.
                let pass = planned
                    .downcast_ref::<BalansPassExec>()
                    .unwrap_or_else(|| panic!("{method}: {shown}"));
                assert_eq!(pass.specs().len(), request.config.passes(), "{method}");
                assert_eq!(pass.specs()[0].config, request.config);
            } else {
                // Stages: every task step over the scan, a boundary above every global step,
                // the leaf-summing steps with the scan shifted by a partition.
                assert!(planned.is::<BalansGatherExec>(), "{method}: {shown}");
                let mut steps = Vec::new();
                planned
                    .apply(|node| {
                        if let Some(task) = node.downcast_ref::<BalansTaskExec>() {
                            assert_eq!(task.spec().config, request.config);
                            assert_eq!(task.has_next(), task.step().reads_next(), "{shown}");
                            if task.has_state() {
                                assert!(task.children()[task.children().len() - 1]
                                    .is::<datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec>());
                            }
                            steps.push(task.step().name());
                        }
                        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
                    })
                    .unwrap();
                let middle = match method {
                    Method::ComBat => "moments",
                    Method::Sphering => "sphering-partial",
                    _ => "smooth-partial",
                };
                assert_eq!(steps.first(), Some(&"apply"), "{shown}");
                assert_eq!(steps.last(), Some(&"ingest"), "{shown}");
                assert!(steps.contains(&middle), "{method}: {shown}");
            }
            let bytes =
                physical_plan_to_bytes_with_extension_codec(planned.clone(), &physical).unwrap();
            let back =
                physical_plan_from_bytes_with_extension_codec(&bytes, &task, &physical).unwrap();
            assert_eq!(
                displayable(back.as_ref()).indent(true).to_string(),
                displayable(planned.as_ref()).indent(true).to_string(),
                "{method}"
            );
            // Row-group partitions do not survive DataFusion's plan serialisation: the
            // decoded table scans whole files (one file here), in the same row order.
            let mut scan = back.clone();
            while let Some(child) = scan.children().first().map(|c| (*c).clone()) {
                scan = child;
            }
            assert_eq!(scan.name(), "DataSourceExec");
            assert_eq!(scan.output_partitioning().partition_count(), 1);
        }
    }

    #[test]
    fn payloads_are_tagged_and_checked() {
        let payload = NodePayload::Passes(vec![PassPayload {
            features: vec!["a".into()],
            batch: vec!["b".into()],
            config: BalansConfig::default(),
            pass: 1,
            fit_mask: None,
            anchor_label: Some("Metadata_Compound".into()),
        }]);
        let mut buf = Vec::new();
        encode_payload(&payload, &mut buf).unwrap();
        assert_eq!(decode_payload(&buf).unwrap().unwrap(), payload);
        // Anything else is left to Ballista's codec; a damaged payload is an error.
        assert!(decode_payload(b"\x0a\x03abc").is_none());
        let mut damaged = buf[..buf.len() - 3].to_vec();
        damaged.extend_from_slice(b"!!!");
        assert!(decode_payload(&damaged).unwrap().is_err());
    }

    #[test]
    fn a_one_machine_step_is_refused_with_the_reason() {
        use balans_operators::exec::preprocess::PlannedTable;
        type Boxed = Box<dyn std::error::Error + Send + Sync>;
        #[derive(Debug)]
        struct Finished;
        impl PlannedTable for Finished {
            fn schema(&self) -> std::result::Result<SchemaRef, Boxed> {
                Ok(Arc::new(datafusion::arrow::datatypes::Schema::empty()))
            }
            fn stream(
                &self,
            ) -> std::result::Result<datafusion::execution::SendableRecordBatchStream, Boxed>
            {
                Err("not streamed here".into())
            }
        }
        let codec = BalansPhysicalCodec::new(Arc::new(NoProgress));
        let node: Arc<dyn ExecutionPlan> =
            Arc::new(PreprocessExec::try_new(Arc::new(Finished), "test".into()).unwrap());
        let err = codec
            .try_encode(
                node,
                &mut Vec::new(),
                &datafusion_proto::physical_plan::DefaultPhysicalProtoConverter {},
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("balans preprocess --scheduler"),
            "{err}"
        );
    }
}
