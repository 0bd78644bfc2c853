import sys
from pathlib import Path

# tests/ holds small helpers (finite_differences) imported by the test modules.
sys.path.insert(0, str(Path(__file__).parent))
