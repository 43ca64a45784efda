#!/usr/bin/env bash
# GPU smoke run of every bundle: train (AMP on: three bundles default to it on CUDA and the cxr step
# asks for it with --amp true, so the AMP path still runs), evaluate, infer, export to
# TorchScript, and one single-process torchrun epoch through configs/multi_gpu_train.json (NCCL).
# CI has no GPU; this is run by hand on a CUDA machine. It needs MONAI, nibabel, pytorch-ignite and
# fire next to a CUDA torch (pip install -e . does it) and the prepared demo data (make demo, or the
# data_prep commands in integration/gpu/README.md).
#
#   bash integration/gpu/smoke.sh DATA OUT
#
# DATA holds lidc_prepared/ luna16_prepared/ drr/ pggn/ (as `make demo` writes them); OUT receives
# one log per step and summary.tsv (step, exit status, seconds). The script goes on after a failed
# step and exits non-zero if any step failed. ONLY="lf_train lf_evaluate" runs the named steps alone.
set -u
DATA=$(cd "$1" && pwd)
OUT=$(mkdir -p "$2" && cd "$2" && pwd)
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
FAILED=0
printf 'step\texit\tseconds\n' >"$OUT/summary.tsv"

step() { # step NAME BUNDLE CMD... (skipped unless NAME is in $ONLY, when ONLY is set)
    local name=$1 bundle=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    local t0=$SECONDS
    (cd "$REPO/bundles/$bundle" && "$@") >"$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$OUT/summary.tsv"
    [ $rc -eq 0 ] || { FAILED=1; tail -n 15 "$OUT/$name.log"; }
}
run() { "$PY" -m monai.bundle run "$@"; }
export_ts() { "$PY" -m monai.bundle ckpt_export network_def --filepath "$1" --ckpt_file "$2" --meta_file configs/metadata.json --config_file configs/inference.json; }
first_images() { ls "$1"/images/*.nii.gz | head -n 2 | sed "s/.*/'&'/" | paste -sd, | sed 's/.*/[&]/'; } # a list of 2 scans
ddp() { "$PY" -m torch.distributed.run --nproc_per_node=1 -m monai.bundle run "$@"; }

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 2

LF=lung_field_ct_segmentation
W="$OUT/$LF"
step lf_train $LF run --config_file configs/train.json --dataset_dir "$DATA/lidc_prepared" --val_fold 0 \
    --train#trainer#max_epochs 2 --val_interval 1 --ckpt_dir "$W/models" --output_dir "$W/train"
step lf_evaluate $LF run --config_file "['configs/train.json','configs/evaluate.json']" --dataset_dir "$DATA/lidc_prepared" \
    --val_fold 0 --ckpt_dir "$W/models" --output_dir "$W/eval"
step lf_inference $LF run --config_file configs/inference.json --input_path "$(first_images "$DATA/lidc_prepared")" \
    --output_dir "$W/pred"
step lf_export $LF export_ts "$W/model.ts" models/model.pt
step lf_torchrun $LF ddp --config_file "['configs/train.json','configs/multi_gpu_train.json']" --dataset_dir "$DATA/lidc_prepared" \
    --train#trainer#max_epochs 1 --val_interval 1 --ckpt_dir "$W/ddp" --output_dir "$W/ddp"

LN=lung_nodule_ct_segmentation
W="$OUT/$LN"
step ln_train $LN run --config_file configs/train.json --dataset_dir "$DATA/luna16_prepared" --val_fold 0 --epochs 2 --val_interval 1 \
    --ckpt_dir "$W/models" --output_dir "$W/train"
step ln_evaluate $LN run --config_file "['configs/train.json','configs/evaluate.json']" --dataset_dir "$DATA/luna16_prepared" \
    --val_fold 0 --output_dir "$W/eval"
step ln_inference_tta $LN run --config_file configs/inference.json --input_path "$(first_images "$DATA/luna16_prepared")" --tta true --output_dir "$W/pred"
step ln_export $LN export_ts "$W/model.ts" models/model.pt
step ln_torchrun $LN ddp --config_file "['configs/train.json','configs/multi_gpu_train.json']" --dataset_dir "$DATA/luna16_prepared" \
    --epochs 1 --val_interval 1 --ckpt_dir "$W/ddp" --output_dir "$W/ddp"

CX=lung_nodule_cxr_drr_segmentation
W="$OUT/$CX"
step cxr_train $CX run --config_file configs/train.json --dataset_dir "$DATA/drr" --image_size 128 --max_epochs 2 --val_interval 1 --amp true \
    --ckpt_dir "$W/models" --output_dir "$W/train"
step cxr_evaluate $CX run --config_file "['configs/train.json','configs/evaluate.json']" --dataset_dir "$DATA/drr" --val_fold 0 \
    --output_dir "$W/eval"
step cxr_inference $CX run --config_file configs/inference.json --input_datalist "$DATA/drr/datalist.json" --input_folds 0 \
    --output_dir "$W/pred"
step cxr_export $CX export_ts "$W/model.ts" models/model.pt
step cxr_torchrun $CX ddp --config_file "['configs/train.json','configs/multi_gpu_train.json']" --dataset_dir "$DATA/drr" \
    --image_size 128 --max_epochs 1 --val_interval 1 --ckpt_dir "$W/ddp" --output_dir "$W/ddp"

PG=lung_pggn_ct_classification
W="$OUT/$PG"
step pg_train_image $PG run --config_file configs/train.json --dataset_dir "$DATA/pggn" --train#trainer#max_epochs 2 \
    --ckpt_dir "$W/models" --output_dir "$W/train"
step pg_train_fusion $PG run --config_file "['configs/train.json','configs/fusion.json']" --dataset_dir "$DATA/pggn" \
    --train#trainer#max_epochs 2 --image_checkpoint models/model.pt --tabular_checkpoint models/model_tabular.pt \
    --output_dir "$W/train_fusion" --ckpt_dir "$W/models_fusion"
step pg_evaluate $PG run --config_file "['configs/train.json','configs/evaluate.json']" --dataset_dir "$DATA/pggn" --output_dir "$W/eval"
step pg_inference_fusion $PG run --config_file "['configs/inference.json','configs/fusion.json']" --input_path "$DATA/pggn/pggn.csv" \
    --output_dir "$W/pred"
step pg_export $PG export_ts "$W/model.ts" models/model.pt
step pg_torchrun $PG ddp --config_file "['configs/train.json','configs/multi_gpu_train.json']" --dataset_dir "$DATA/pggn" \
    --train#trainer#max_epochs 1 --ckpt_dir "$W/ddp" --output_dir "$W/ddp"

exit $FAILED
