"""Lightning OPD: offline on-policy distillation, one small module per pipeline stage."""
