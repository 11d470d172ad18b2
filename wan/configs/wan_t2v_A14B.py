"""Wan2.2 T2V-A14B: two 14B experts, switch at t = 875, 40 UniPC steps, shift 12, guide (3.0, 4.0)."""
from .task_config import TaskConfig

t2v_A14B = TaskConfig(name="t2v-A14B")
