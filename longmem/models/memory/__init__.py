"""Memory plug-ins and the one typed state object they share."""
from longmem.models.memory.state import KNNState, LSTMState, State, TokensState, XLState
from longmem.models.memory.xl import XLMemory

__all__ = ["KNNState", "LSTMState", "State", "TokensState", "XLState", "XLMemory"]
