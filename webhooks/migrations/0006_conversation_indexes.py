"""Indexes every stored message had to update for nothing.

The tenant foreign keys' own indexes repeat the first column of a composite
index on the same table (webhooks_unique_delivery and webhooks_chat_open,
webhooks_one_conversation_per_chat, webhooks_outbound_key): those serve every
lookup by tenant. The answering message's key is NULL on nearly every row:
indexed only where set.

The indexes are dropped by name rather than by altering the fields: on SQLite
an AlterField rebuilds the whole table (twice for the messages), minutes with
a million stored rows. The names are Django's, the same on SQLite and PostgreSQL.
"""

from django.db import migrations, models

FK_INDEXES = [
    ("webhooks_inboundmessage", "webhooks_inboundmessage_instance_id_8de22215", "instance_id"),
    (
        "webhooks_inboundmessage",
        "webhooks_inboundmessage_answered_by_id_cac0a889",
        "answered_by_id",
    ),
    ("webhooks_conversation", "webhooks_conversation_instance_id_31a8dd46", "instance_id"),
    ("webhooks_outboundmessage", "webhooks_outboundmessage_instance_id_f2155b49", "instance_id"),
]


class Migration(migrations.Migration):
    dependencies = [
        ("instances", "0006_secrets_encrypted_at_rest"),
        ("webhooks", "0005_duplicate_window"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    sql=f'DROP INDEX IF EXISTS "{name}"',
                    reverse_sql=f'CREATE INDEX "{name}" ON "{table}" ("{column}")',
                )
                for table, name, column in FK_INDEXES
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="conversation",
                    name="instance",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=models.deletion.CASCADE,
                        related_name="conversations",
                        to="instances.instanceconfig",
                    ),
                ),
                migrations.AlterField(
                    model_name="inboundmessage",
                    name="answered_by",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=models.deletion.SET_NULL,
                        related_name="folded",
                        to="webhooks.inboundmessage",
                    ),
                ),
                migrations.AlterField(
                    model_name="inboundmessage",
                    name="instance",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=models.deletion.CASCADE,
                        related_name="messages",
                        to="instances.instanceconfig",
                    ),
                ),
                migrations.AlterField(
                    model_name="outboundmessage",
                    name="instance",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=models.deletion.CASCADE,
                        related_name="sent",
                        to="instances.instanceconfig",
                    ),
                ),
            ],
        ),
        migrations.AddIndex(
            model_name="inboundmessage",
            index=models.Index(
                condition=models.Q(("answered_by__isnull", False)),
                fields=["answered_by"],
                name="webhooks_answered_by",
            ),
        ),
    ]
