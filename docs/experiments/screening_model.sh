#!/usr/bin/env bash
# The screening model of README "Screening a sample for rare cells": cancer vs blood, fine-tuned from the
# OPD-pretrained MobileNetV2 on many acquisition sessions (the tail of a new session's blood scores is
# what a screen at a false-positive rate of 1e-3 needs, and it is learnt from session-to-session
# variation, not from more maps of the same sessions).
#
#   bash docs/experiments/screening_model.sh [OUT] [SESSIONS] [MAPS_PER_SESSION] [SEED]
#
# Defaults: OUT=screening_model, 30 sessions per class of 24 maps each (3,600 simulated maps), seed 515
# (never one a spike-in sample or control uses); about 3.5 min of CPU to train on 2 cores (16 min wall,
# shared). Chosen on a development session (sample seed 303, control seed 404, 300 SW480 of that session
# at seed 707), not on the seed-101 sample the README reports: at the control's 1e-3 threshold it found
# 265 of 300 SW480 cells (0.88) where the demo's five-class model found 252 (0.84); 40 sessions of 60
# maps (args 40 60 616) separated better before the out-of-distribution veto (286 vs 280 of 300) but its
# embedding block vetoed 30 of them (256 found). Then measured once on the README's sample (20,000 blood
# + 20 SW480, seed 101) with its 10,000-cell control (seed 202): 16 of 20 found at the control threshold
# (0.9817) with 27 blood cells flagged (0.135%); finding 16 costs 11 blood cells (0.06%), 39 (0.20%) with
# the demo's five-class model. Writes OUT/exports (the simulated MATLAB exports),
# OUT/opd_dataset.h5 and the model folder OUT/opd_mobilenetv2_cancer_vs_blood. A lab replaces the first
# step by its own labelled exports: one folder per class and acquisition session (the sessions are the
# split's groups), as many sessions as it can label.
# Run from the repository root; PYTHON defaults to .venv/bin/python.
set -euo pipefail
OUT=${1:-screening_model}
SESSIONS=${2:-30}
PER_SESSION=${3:-24}
SEED=${4:-515}
PYTHON=${PYTHON:-.venv/bin/python}
WORKERS=${WORKERS:-2}

$PYTHON -m opdcells simulate --out "$OUT/exports" --sessions-per-class "$SESSIONS" \
    --n-per-class $((SESSIONS * PER_SESSION)) --seed "$SEED" --workers "$WORKERS"
$PYTHON -m opdcells load "$OUT/exports" --out "$OUT/opd_dataset.h5"
# whole sessions held out: 20% validation (calibration, operating point, OOD thresholds), 15% test
$PYTHON -m opdcells train --data "$OUT/opd_dataset.h5" --model opd_mobilenetv2 --task cancer_vs_blood \
    --val-size 0.2 --test-size 0.15 --epochs 6 --head-epochs 1 --patience 2 \
    --out "$OUT/opd_mobilenetv2_cancer_vs_blood"
