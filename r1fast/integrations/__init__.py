"""Drop-in APIs for other trainers: ``liger`` (a ``LigerFusedLinearGRPOLoss`` replacement)."""
