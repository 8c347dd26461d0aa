"""Named errors. Each carries a one-line message that says what was expected,
what was found and, where there is one, the fix. The CLI prints ``str(err)``
and exits non-zero; workers turn them into dead-letter reasons."""


def first_line(err: BaseException, width: int = 200) -> str:
    """The first line of ``err``'s message, at most ``width`` characters; its type's
    name when the message is empty. For one-line reasons built from third-party
    exceptions, whose messages often run to tracebacks or dumps.

    >>> first_line(ValueError("bad value\\nat line 3"))
    'bad value'
    >>> first_line(KeyError())
    'KeyError'
    """
    text = str(err).strip()
    return text.splitlines()[0][:width] if text else type(err).__name__


class PGKDError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(PGKDError):
    """A setting is missing, unknown or invalid."""


class DataError(PGKDError):
    """Input data is unusable: missing file or column, unseen labels, empty texts."""


class ModelError(PGKDError):
    """A model cannot be built, loaded or saved."""


class ModelIntegrityError(ModelError):
    """A stored model's files do not match the checksums in its manifest."""


class InferenceProcessError(ModelError):
    """The child process that serves a model (PGKD_INFERENCE_PROCESS) died, or cannot be started."""


class RegistryError(PGKDError):
    """The model registry refuses an operation: unknown version, nothing to roll back to."""


class RegistryUnavailable(RegistryError):
    """Redis, which holds the registry's pointer and history, does not answer."""


class GraphError(Exception):
    """The forward pass cannot be served as the graph asked for (PGKD_INFERENCE_GRAPH); another serves."""


class TeacherError(PGKDError):
    """The teacher failed after its retries, or answered with unusable output."""


class BudgetExhausted(TeacherError):
    """The teacher spend budget is used up; calls stop until it is raised."""


class TopicError(PGKDError):
    """Kafka refused to create one of the product's topics, or a topic's partitions have no leader."""


class DeadLetterError(PGKDError):
    """The dead-letter topic cannot be read or replayed: Kafka or Redis does not answer, or refuses."""
