"""Knowledge distillation: recover a pruned student's quality from its teacher."""
